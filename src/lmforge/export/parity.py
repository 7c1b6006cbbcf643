"""Parity of an exported artefact with the model it came from, each run by its own runtime.

    report = parity(reference=torch_runner(model), exported=OnnxRunner(path), tok=tok, prompts=[...])

A runner maps one token sequence to its logits, (T, vocab) fp32 numpy. On fixed prompts the reference
generates `new_tokens` greedy tokens; both runners then score prompt + continuation:
- logits: max |difference| over every position and vocabulary entry
- kl: KL(reference || export) per position, in nats (mean, max)
- greedy: top-1 agreement at the generated positions (teacher forced: same context for both), and
  free-running greedy generation by the export itself: identical continuations and the first divergence
- perplexity on a small fixed text (non-overlapping windows of `seq_len`): reference, export, relative change
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lmforge.model.transformer import Transformer

Runner = Callable[[Sequence[int]], np.ndarray]

DEFAULT_PROMPTS = (
    "The quick brown fox",
    "Once upon a time, in a kingdom by the sea,",
    "To be, or not to be, that is the question:",
)

# Scored for the perplexity change when no text file is given (public domain: Shakespeare, Sonnet 18).
DEFAULT_TEXT = (
    "Shall I compare thee to a summer's day?\n"
    "Thou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\n"
    "And summer's lease hath all too short a date;\n"
    "Sometime too hot the eye of heaven shines,\n"
    "And often is his gold complexion dimm'd;\n"
    "And every fair from fair sometime declines,\n"
    "By chance or nature's changing course untrimm'd;\n"
    "But thy eternal summer shall not fade,\n"
    "Nor lose possession of that fair thou ow'st;\n"
    "Nor shall death brag thou wander'st in his shade,\n"
    "When in eternal lines to time thou grow'st:\n"
    "So long as men can breathe or eyes can see,\n"
    "So long lives this, and this gives life to thee.\n"
)


def torch_runner(model: Transformer) -> Runner:
    @torch.inference_mode()
    def run(ids: Sequence[int]) -> np.ndarray:
        x = torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)
        return model(x)[0].float().cpu().numpy()

    return run


def greedy(run: Runner, prompt: Sequence[int], n: int, max_len: int) -> list[int]:
    """n greedy tokens, recomputing the whole sequence each step (runtime-agnostic; fine for short checks)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        if len(ids) >= max_len:
            break
        nxt = int(run(ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def forward_passes(
    prompt_ids: Sequence[Sequence[int]], text_ids: Sequence[int], new_tokens: int, seq_len: int, max_len: int
) -> int:
    """How many runner calls `parity` makes with these arguments (the total of its progress bar)."""
    calls = 2 * len(range(0, len(text_ids) - 1, seq_len))  # perplexity windows, both runners
    for p in prompt_ids:
        k = max(0, min(new_tokens, max_len - len(p)))  # greedy tokens the reference generates
        calls += 2 * k + 2  # both runners generate k tokens and score prompt + continuation once
    return calls


def counted(run: Runner, tick: Callable[[], None]) -> Runner:
    """`run` calling `tick` after every call (progress)."""

    def wrapped(ids: Sequence[int]) -> np.ndarray:
        out = run(ids)
        tick()
        return out

    return wrapped


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _nll(run: Runner, ids: Sequence[int], seq_len: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = list(ids[start : start + seq_len + 1])
        if len(window) < 2:
            break
        logp = _log_softmax(run(window[:-1]))
        total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return total, count


def parity(
    reference: Runner,
    exported: Runner,
    *,
    prompt_ids: Sequence[Sequence[int]],
    text_ids: Sequence[int],
    new_tokens: int,
    seq_len: int,
    max_len: int,
) -> dict[str, Any]:
    """The parity numbers (see the module docstring); every value is a plain float/int/list for JSON."""
    max_abs, kls = 0.0, []
    agree = total = identical = 0
    divergence: list[int | None] = []
    for prompt in prompt_ids:
        cont = greedy(reference, prompt, new_tokens, max_len)
        seq = [*prompt, *cont]
        a, b = reference(seq), exported(seq)
        max_abs = max(max_abs, float(np.abs(a.astype(np.float64) - b).max()))
        la, lb = _log_softmax(a), _log_softmax(b)
        kls.extend((np.exp(la) * (la - lb)).sum(axis=-1).tolist())
        gen = slice(len(prompt) - 1, len(seq) - 1)  # positions that predicted the continuation
        agree += int((a[gen].argmax(-1) == b[gen].argmax(-1)).sum())
        total += len(cont)
        own = greedy(exported, prompt, len(cont), max_len)
        identical += int(own == cont)
        first = next((i for i, (x, y) in enumerate(zip(own, cont, strict=True)) if x != y), None)
        divergence.append(first)
    nll_a, n = _nll(reference, text_ids, seq_len)
    nll_b, _ = _nll(exported, text_ids, seq_len)
    ppl_a, ppl_b = math.exp(nll_a / max(n, 1)), math.exp(nll_b / max(n, 1))
    return {
        "prompts": len(prompt_ids),
        "new_tokens": new_tokens,
        "max_abs_logit_diff": max_abs,
        "kl_mean": float(np.mean(kls)) if kls else 0.0,
        "kl_max": float(np.max(kls)) if kls else 0.0,
        "greedy_agreement": agree / max(total, 1),
        "greedy_identical": identical,
        "greedy_first_divergence": divergence,
        "perplexity_reference": ppl_a,
        "perplexity_export": ppl_b,
        "perplexity_rel_change": (ppl_b - ppl_a) / ppl_a,
        "perplexity_tokens": n,
    }


def print_table(report: dict[str, Any], title: str) -> None:

    table = Table(title=title)
    table.add_column("check")
    table.add_column("value", justify="right")
    p = report["parity"]
    rows = [
        ("runtime", report["runtime"]),
        ("max |logit diff|", f"{p['max_abs_logit_diff']:.3g}"),
        ("KL mean / max (nats)", f"{p['kl_mean']:.3g} / {p['kl_max']:.3g}"),
        (
            "greedy top-1 agreement",
            f"{p['greedy_agreement']:.4f} over {p['prompts']}x{p['new_tokens']} tokens",
        ),
        ("identical greedy runs", f"{p['greedy_identical']} / {p['prompts']}"),
        (
            "perplexity ref -> export",
            f"{p['perplexity_reference']:.4f} -> {p['perplexity_export']:.4f} ({p['perplexity_rel_change']:+.2e})",
        ),
    ]
    for key in ("tokenizer_match", "chat_template_match", "decode_graph_greedy_identical"):
        if key in report:
            rows.append((key.replace("_", " "), str(report[key])))
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=True).print(table)


__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TEXT",
    "Runner",
    "counted",
    "forward_passes",
    "greedy",
    "parity",
    "print_table",
    "torch_runner",
]
