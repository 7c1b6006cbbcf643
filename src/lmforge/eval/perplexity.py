"""Perplexity and bits per byte of a model on token shards or raw text files.

    from lmforge.eval.perplexity import text_perplexity, shards_perplexity
    r = text_perplexity(model, tok, ["notes.txt"], seq_len=256, stride=128)
    r["loss"], r["perplexity"], r["bits_per_byte"], r["tokens"]

Both score a token stream with a sliding window (the HF "perplexity of fixed-length models" recipe): a
window of `seq_len` tokens moves by `stride`, and each window scores only the tokens the previous one did
not, so every token is predicted exactly once with at least `seq_len - stride` tokens of context (all of it
when stride = seq_len: plain non-overlapping chunks). The stream starts with EOS, so its first real token
is predicted too. loss = mean NLL in nats per token; perplexity = exp(loss);
bits per byte = total nats / (UTF-8 bytes x ln 2), comparable across tokenizers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.shards import ShardSet
from lmforge.errors import DataError
from lmforge.io import read_text
from lmforge.progress import Progress


def _windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first) over a stream of n tokens: inputs ids[begin:end], targets ids[begin+1:end+1],
    of which the targets at absolute index >= first are scored (the earlier ones were, by a previous window)."""
    next_target = 1  # ids[0] (the leading EOS) is never a target
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n - 1)
        yield begin, end, next_target
        next_target = end + 1
        if end == n - 1:
            break


@torch.inference_mode()
def stream_nll(
    model: nn.Module,
    ids: np.ndarray | Sequence[int],
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
) -> tuple[float, int]:
    """(total NLL in nats, scored tokens) of ids[1:] given everything before, with a sliding window."""
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise DataError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    arr = np.asarray(ids, dtype=np.int64)
    n = len(arr)
    if n < 2:
        return 0.0, 0
    cfg = getattr(model, "cfg", None)
    vocab: int | None = getattr(cfg, "vocab_size", None)
    if vocab is not None and (int(arr.max()) >= vocab or int(arr.min()) < 0):
        raise DataError(
            f"token ids outside the model's vocabulary [0, {vocab}): wrong tokenizer for this model?"
        )
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pending: list[tuple[int, int, int]] = []

    def flush() -> None:
        nonlocal total, count
        L = max(e - b for b, e, _ in pending)
        x = torch.zeros(len(pending), L, dtype=torch.long)
        y = torch.full((len(pending), L), -100, dtype=torch.long)  # -100: not scored
        for r, (b, e, f) in enumerate(pending):
            x[r, : e - b] = torch.from_numpy(arr[b:e])
            tgt = torch.from_numpy(arr[b + 1 : e + 1]).clone()  # a view would write -100 into arr
            tgt[: f - (b + 1)] = -100  # already scored by an earlier window
            y[r, : e - b] = tgt
        logits = model(x.to(device)).float()  # right padding: causal, so it does not touch real positions
        nll = F.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((y != -100).sum())
        if progress is not None:
            progress(int((y != -100).sum()))
        pending.clear()

    for w in _windows(n, seq_len, stride):
        pending.append(w)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    assert count == n - 1, (count, n)
    return total, count


def summarize(nll: float, tokens: int, nbytes: int) -> dict[str, Any]:
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / (nbytes * math.log(2)) if nbytes else None,
        "tokens": tokens,
        "bytes": nbytes,
        "nll_nats": nll,
    }


def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    files: Sequence[str | Path],
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Each file is its own stream ([EOS] + tokens); the totals are summed over files."""
    nll, tokens, nbytes = 0.0, 0, 0
    t0 = time.perf_counter()
    streams = []
    for f in files:
        text = read_text(f, "text file")
        streams.append(([tokenizer.eos_id, *tokenizer.encode(text)], len(text.encode("utf-8"))))
    if progress is not None:
        progress.set_total(sum(max(len(ids) - 1, 0) for ids, _ in streams))
    tick = progress.advance if progress is not None else None
    for ids, size in streams:
        s, c = stream_nll(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=tick)
        nll, tokens, nbytes = nll + s, tokens + c, nbytes + size
    if tokens == 0:  # otherwise an empty file would score a perfect perplexity of 1
        raise DataError(f"{', '.join(str(f) for f in files)}: no text to score (empty files)")
    out = summarize(nll, tokens, nbytes)
    out["seconds"] = time.perf_counter() - t0
    return out


def shards_perplexity(
    model: nn.Module,
    directory: str | Path,
    *,
    split: str = "val",
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    verify: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score a tokens directory's split. With `max_tokens`, only the first tokens are scored and the bytes
    are prorated (bytes x scored / total tokens), as pretraining's validation does."""
    shards = ShardSet(directory, split, verify=verify)
    if shards.num_tokens == 0:
        raise DataError(f"{directory}: split {split!r} holds no tokens")
    t0 = time.perf_counter()
    nll, tokens = 0.0, 0
    budget = max_tokens or shards.num_tokens
    if progress is not None:
        progress.set_total(min(budget, shards.num_tokens))
    for arr in shards.arrays:
        if tokens >= budget:
            break
        part = np.asarray(arr[: budget - tokens], dtype=np.int64)
        s, c = stream_nll(
            model,
            np.concatenate([[shards.eos_id], part]),
            seq_len=seq_len,
            stride=stride,
            batch_size=batch_size,
            progress=progress.advance if progress is not None else None,
        )
        nll, tokens = nll + s, tokens + c
    nbytes = round(shards.num_bytes * tokens / shards.num_tokens)
    out = summarize(nll, tokens, nbytes)
    out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["shards_perplexity", "stream_nll", "summarize", "text_perplexity"]
