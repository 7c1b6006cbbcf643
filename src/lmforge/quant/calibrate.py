"""Calibration data for GPTQ: N token sequences of length L drawn from a tokens directory, seeded.

    ids = calibration_ids("runs/demo/tokens", n=128, seq_len=256, seed=0)   # LongTensor (128, 256)

Windows are read with the same shard reader as pretraining and evaluation (`data.shards.ShardSet`), from the
train split by default so the validation text scored in the quality report stays unseen. A window starts
at a uniformly random position of a shard chosen with probability proportional to its length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmforge.data.shards import ShardSet
from lmforge.errors import DataError


def calibration_ids(
    directory: str | Path,
    *,
    n: int,
    seq_len: int,
    seed: int = 0,
    split: str = "train",
    verify: bool = True,
) -> Tensor:
    """(n, seq_len) int64 token ids; the same arguments give the same windows on every machine."""
    shards = ShardSet(directory, split, verify=verify)
    lengths = np.array([len(a) for a in shards.arrays], dtype=np.int64)
    usable = np.flatnonzero(lengths > seq_len)
    if len(usable) == 0:
        raise DataError(
            f"{directory}: split {split!r} has no shard longer than calibration seq_len={seq_len} "
            f"(longest: {int(lengths.max(initial=0))} tokens); lower calibration.seq_len"
        )
    rng = np.random.default_rng(seed)
    weights = lengths[usable] / lengths[usable].sum()
    picks = rng.choice(usable, size=n, p=weights)
    out = np.empty((n, seq_len), dtype=np.int64)
    for row, s in enumerate(picks):
        start = int(rng.integers(0, lengths[s] - seq_len))
        out[row] = shards.arrays[s][start : start + seq_len]
    return torch.from_numpy(out)


__all__ = ["calibration_ids"]
