"""Which token windows make up each global batch: a seeded pure function of the step.

The token stream (all shards of a split, concatenated) is cut into windows of `seq_len + 1` tokens at a
stride of `seq_len` (inputs are window[:-1], targets window[1:]). Each epoch visits every window once, in
the order of a permutation drawn from `np.random.default_rng([seed, epoch])`. Global step `s` takes windows
`s*G .. (s+1)*G - 1` of that endless sequence, and rank `r` of `W` takes the contiguous rows
`r*G/W .. (r+1)*G/W - 1`, split into micro batches. So the state to save is just (seed, step), and the
same global batch is trained whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.data.order import EpochOrder


class TokenWindows:
    """Random access to windows of `seq_len + 1` tokens across several 1-D token arrays."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int) -> None:
        self.arrays = [a for a in arrays if len(a) > 0]
        self.seq_len = seq_len
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # global offset of each array
        self.num_tokens = int(self.starts[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def window(self, index: int) -> np.ndarray:
        """Tokens [index*T, index*T + T + 1), read across array boundaries if needed (int64)."""
        lo = index * self.seq_len
        hi = lo + self.seq_len + 1
        a = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            arr_lo = int(self.starts[a])
            take = min(hi, int(self.starts[a + 1])) - lo
            pieces.append(np.asarray(self.arrays[a][lo - arr_lo : lo - arr_lo + take], dtype=np.int64))
            lo += take
            a += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class BatchSampler:
    """Global batch `step` -> this rank's micro batches, each `{"input_ids", "labels"}` of (micro, T)."""

    def __init__(
        self,
        windows: TokenWindows,
        *,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        assert global_batch % (micro_batch * world_size) == 0, "checked by the config"
        assert windows.num_windows > 0, "checked by the caller"
        self.windows = windows
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.order = EpochOrder(windows.num_windows, seed)

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def global_indices(self, step: int) -> np.ndarray:
        """Window indices of global batch `step` (all ranks), in row order."""
        return self.order.batch(step, self.global_batch)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.windows.num_windows

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch // self.world_size
        rows = self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        data = np.stack([self.windows.window(int(i)) for i in rows])  # (per_rank, T + 1)
        out = []
        for m in range(self.accum_steps):
            chunk = torch.from_numpy(data[m * self.micro_batch : (m + 1) * self.micro_batch])
            out.append({"input_ids": chunk[:, :-1].contiguous(), "labels": chunk[:, 1:].contiguous()})
        return out

    def state(self, step: int) -> dict[str, int]:
        return {
            "seed": self.seed,
            "step": step,
            "global_batch": self.global_batch,
            "seq_len": self.windows.seq_len,
        }


def eval_batches(windows: TokenWindows, num_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed validation batches: windows spread evenly over the split, the same at every evaluation."""
    total = min(windows.num_windows, num_batches * batch_size)
    idx = np.linspace(0, windows.num_windows - 1, num=total).round().astype(np.int64) if total else []
    out = []
    for b in range(0, total, batch_size):
        data = torch.from_numpy(np.stack([windows.window(int(i)) for i in idx[b : b + batch_size]]))
        out.append({"input_ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()})
    return out
