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

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def count_targets(batch: Batch) -> int:
    """Target tokens in a batch, known before the forward pass (for the global normaliser)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def causal_lm(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over targets; `labels` are already shifted (B, T)."""
    logits = model(batch["input_ids"])  # (B, T, V)
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
