"""The seeded epoch order every batch source shares: its state is (seed, step), so resume is exact.

order = EpochOrder(n_rows, seed)
rows = order.batch(step, global_batch)     # the same rows for a step, whatever happened before
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    """The endless sequence that visits items 0..n-1 once per epoch, epoch `e` in the order of
    `np.random.default_rng([seed, e]).permutation(n)`; global batch `step` of size G is its items
    step*G .. (step+1)*G - 1. Shared by every batch source, so each one's state is (seed, step)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        for i in range(size):
            k = step * size + i
            out[i] = self._permutation(k // self.n)[k % self.n]
        return out
