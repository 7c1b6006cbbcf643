"""Training objectives: `(model, batch) -> (loss_sum, n_tokens)`, summed over the target tokens.

Returning a sum and a count (not a mean) lets the loop normalise by the number of target tokens in the
whole accumulated global batch, so micro batches with different numbers of supervised tokens (SFT masks,
labels = -100) weigh each token equally. Fine-tuning and preference objectives plug in with the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batch import COUNT, IGNORE_INDEX
from lmforge.train.distributed import all_reduce_sum

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def count_targets(batch: Batch) -> int:
    """Targets in a batch, known before the forward pass (for the global normaliser): tokens, or `count`."""
    if COUNT in batch:
        return int(batch[COUNT].sum())
    return int((batch["labels"] != IGNORE_INDEX).sum())


def causal_lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over targets; `labels` are already shifted (B, T), -100 = not a
    target (SFT masks). Packed SFT rows also carry `position_ids` (reset per example) and `attn_mask`
    (no attention across examples)."""
    packed = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
    logits = model(batch["input_ids"], **packed)  # (B, T, V)
    if not isinstance(logits, torch.Tensor):  # an HF model returns an output object
        logits = logits.logits
    labels = batch["labels"]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


# -- preference optimisation (DPO) -------------------------------------------------------------------------
def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 log-probability of each target token (labels already shifted), 0 where ignored."""
    logits = model(input_ids)  # (B, T, V)
    if not isinstance(logits, torch.Tensor):  # an HF model returns an output object
        logits = logits.logits
    out = -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return out.view(labels.shape)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (labels != -100): (B,) float32."""
    return token_logps(model, input_ids, labels).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (Rafailov et al. 2023) and the implicit rewards beta * (log pi - log ref).

    loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h),
    h = (pi_c - ref_c) - (pi_r - ref_r); eps > 0 is conservative DPO (labels flipped with probability eps).
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    z = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen.detach(), rejected.detach()


Reference = Callable[[nn.Module, Batch], torch.Tensor]


class PairObjective:
    """What the pair objectives share: `(model, batch) -> (summed pair losses, pairs)` from the subclass's
    `pair_terms` (losses, chosen, rejected, ...), with the chosen/rejected statistics accumulated until
    `pop_metrics()`, which the loop calls at each log step (means since the previous call)."""

    def __init__(self) -> None:
        self._sums = torch.zeros(5, dtype=torch.float64)

    def pair_terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, chosen, rejected = self.pair_terms(model, batch)[:3]
        self._sums += reward_sums(chosen, rejected)
        return losses.sum(), torch.tensor(losses.shape[0])

    def pop_metrics(self) -> dict[str, float]:
        sums = all_reduce_sum(self._sums.clone())
        self._sums.zero_()
        return reward_metrics(sums)


class DPOObjective(PairObjective):
    """`(model, batch) -> (summed pair losses, pairs)` on batches of rows [chosen..., rejected...].

    Reference log-probs come from the batch (`ref_logps`, precomputed once) or from `reference(model, batch)`
    (computed live, without gradient). Reward statistics accumulate until `pop_metrics()`, which the loop
    calls at each log step (means over the pairs trained on since the previous call).
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference: Reference | None = None) -> None:
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.reference = reference
        super().__init__()

    def pair_terms(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards, policy log-probs) of the batch's pairs."""
        logps = sequence_logps(model, batch["input_ids"], batch["labels"])  # (2m,)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(logps.dtype)
        else:
            assert self.reference is not None, "a batch without ref_logps needs a live reference"
            with torch.no_grad():
                ref = self.reference(model, batch).to(logps.dtype)
        m = logps.shape[0] // 2
        losses, chosen, rejected = dpo_loss(
            logps[:m], logps[m:], ref[:m], ref[m:], self.beta, self.label_smoothing
        )
        return losses, chosen, rejected, logps.detach()


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[pairs, wins, margin, chosen, rejected] summed, float64; a tie counts as half a win."""
    c, r = chosen.detach().double().cpu(), rejected.detach().double().cpu()
    margin = c - r
    wins = (margin > 0).double() + 0.5 * (margin == 0).double()
    return torch.stack(
        [torch.tensor(float(len(c)), dtype=torch.float64), wins.sum(), margin.sum(), c.sum(), r.sum()]
    )


def reward_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Means from `reward_sums`: reward accuracy, margin, chosen and rejected rewards."""
    n = float(sums[0])
    if n == 0:
        return {}
    return {
        "reward_accuracy": float(sums[1]) / n,
        "reward_margin": float(sums[2]) / n,
        "reward_chosen": float(sums[3]) / n,
        "reward_rejected": float(sums[4]) / n,
    }


# -- reward models (Bradley-Terry) ------------------------------------------------------------------------
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair -logsigmoid(r_chosen - r_rejected - margin) (Ouyang et al. 2022; margin as in Llama 2)."""
    return -F.logsigmoid(chosen - rejected - margin)


class RewardObjective(PairObjective):
    """`(reward model, batch) -> (summed pair losses, pairs)` on rows [chosen..., rejected...] (whole
    sequences, data/preference.py:score_collate). Score statistics accumulate until `pop_metrics()`."""

    def pair_terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen scores, rejected scores) of the batch's pairs."""
        scores = model(batch["input_ids"]).float()  # (2m,)
        m = scores.shape[0] // 2
        margin = batch["margin"].to(scores.device, scores.dtype)
        return bradley_terry_loss(scores[:m], scores[m:], margin), scores[:m].detach(), scores[m:].detach()
