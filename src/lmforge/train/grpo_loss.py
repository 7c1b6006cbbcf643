"""The GRPO objective (Shao et al. 2024, DeepSeekMath): group-normalised advantages, the clipped ratio, KL.

For G completions o_1..o_G of one prompt with rewards r_i:

    A_i      = (r_i - mean(r)) / (std(r) + 1e-4)          scale_rewards=false (Dr. GRPO): r_i - mean(r)
    ratio_it = exp(logp_it - logp_old_it)                   logp_old: the policy that sampled the batch
    loss_it  = -min(ratio_it * A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_it
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1   (the k3 estimator, >= 0)

std is the sample standard deviation (n - 1), as TRL's GRPOTrainer. The loss is normalised per completion
token over the whole optimizer batch (`token`) or as the mean over completions of each one's token mean
(`sequence`); the loop divides the returned sum by `count_targets` of the batches, which is the completion
tokens (labels) or, with `count` in the batch, the completions. With one optimisation pass per batch the
old log-probs are the current ones detached (ratio = 1, the gradient unchanged), as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lmforge.data.batch import IGNORE_INDEX
from lmforge.train.distributed import all_reduce_sum
from lmforge.train.objectives import Batch, token_logps

LossType = Literal["token", "sequence"]
STD_EPS = 1e-4  # keeps a group whose rewards barely differ from getting huge advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, N = prompts * group_size in group order -> (N,) advantages within each group."""
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + STD_EPS)
    return centred.reshape(-1).float()


def grpo_token_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token KL, per-token clipped flag), each (B, T); mask them with the labels."""
    adv = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if ref_logps is not None and beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(loss)
    # the clipped branch was taken (its gradient is 0): below the range with A < 0, above it with A > 0
    was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, kl.detach(), was_clipped


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """Summed loss of a micro batch: over tokens (`token`), or of each completion's token mean (`sequence`)."""
    m = mask.to(per_token.dtype)
    if loss_type == "token":
        return (per_token * m).sum()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()


class GRPOObjective:
    """`(model, batch) -> (summed loss, units)` on rollout batches (see train/grpo_data.py for the keys).

    Batch: input_ids, labels (completion tokens only), advantages (B,), optionally old_logps and ref_logps
    (B, T) aligned with labels, and `count` (one per row) when loss_type is `sequence`. KL and clip
    statistics accumulate until `pop_metrics()`, which the loop calls at each log step."""

    def __init__(
        self,
        *,
        beta: float,
        eps_low: float,
        eps_high: float,
        loss_type: LossType,
        extra_metrics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.beta, self.eps_low, self.eps_high, self.loss_type = beta, eps_low, eps_high, loss_type
        self.extra_metrics = extra_metrics  # e.g. the rollouts' rewards and generation speed
        self._sums = torch.zeros(3, dtype=torch.float64)  # [tokens, kl, clipped]

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logps = token_logps(model, batch["input_ids"], labels)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ref = batch.get("ref_logps") if self.beta != 0 else None
        per_token, kl, clipped = grpo_token_terms(
            logps,
            old,
            ref,
            batch["advantages"],
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
        )
        self._sums += torch.stack(
            [mask.sum().double(), (kl * mask).sum().double(), (clipped & mask).sum().double()]
        ).cpu()
        units = batch["count"].sum() if "count" in batch else mask.sum()
        return reduce_loss(per_token, mask, self.loss_type), units

    def pop_metrics(self) -> dict[str, float]:
        sums = all_reduce_sum(self._sums.clone())
        self._sums.zero_()
        n = max(float(sums[0]), 1.0)
        out: dict[str, Any] = {"kl": float(sums[1]) / n, "clip_fraction": float(sums[2]) / n}
        if self.extra_metrics is not None:
            out.update(self.extra_metrics())
        return out


__all__ = ["GRPOObjective", "group_advantages", "grpo_token_terms", "reduce_loss", "token_logps"]
