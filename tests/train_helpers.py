"""Shared pieces of the training tests: a tiny causal LM (with dropout, so RNG state matters) and data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.train.distributed import DistInfo
from lmforge.train.loop import LoopSettings, Trainer
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.sampler import BatchSampler, TokenWindows
from lmforge.train.schedule import ScheduleConfig


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # (B, T, D) each
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
        return x + self.drop(self.proj(a.squeeze(1)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, n_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, dropout) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, V)


def token_stream(n: int = 20_000, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """Learnable tokens: a noisy repeating pattern, so the loss falls within a few steps."""
    rng = np.random.default_rng(seed)
    base = np.arange(n) % 17 + (np.arange(n) // 17) % 3
    noise = rng.integers(0, vocab, size=n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


def make_trainer(
    run_dir: Path,
    *,
    steps: int = 8,
    global_batch: int = 8,
    micro_batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    init_seed: int = 0,
    checkpoint_every: int = 0,
    keep: int = 0,
    objective: Any = causal_lm,
    max_bad_steps: int = 3,
    **kw: Any,
) -> Trainer:
    torch.manual_seed(init_seed)
    model = TinyLM()
    windows = TokenWindows([token_stream()[:9000], token_stream()[9000:]], seq_len)
    sampler = BatchSampler(windows, global_batch=global_batch, micro_batch=micro_batch, seed=seed)
    settings = LoopSettings(
        total_steps=steps,
        lr=3e-3,
        schedule=ScheduleConfig(kind="cosine", warmup_steps=2),
        grad_clip=1.0,
        log_every=1,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep,
        max_bad_steps=max_bad_steps,
        progress=False,
    )
    return Trainer(
        model=model,
        train_model=model,
        optimizer=build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1)),
        batches=sampler,
        objective=objective,
        settings=settings,
        run_dir=run_dir,
        info=DistInfo(),
        **kw,
    )
