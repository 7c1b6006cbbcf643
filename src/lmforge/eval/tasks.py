"""Evaluation tasks from local JSONL: multiple choice by log-likelihood (acc, acc_norm) and generation
scored by BLEU (sacrebleu) and exact match; plus the token-level scorer the lm-eval adapter shares.

    from lmforge.eval.tasks import multiple_choice, generation
    multiple_choice(model, tok, "arc.jsonl")      # {"acc": ..., "acc_norm": ..., "n": ...}
    generation(engine, "qa.jsonl", prompt_field="question", reference_field="answer", max_tokens=32)

Multiple choice follows lm-eval's HellaSwag/ARC/PIQA recipe: context = the "query" (or "ctx", "question",
"goal") field, continuation = target_delimiter + choice; the score of a choice is the summed log-probability of
its tokens (the context/continuation split is lm-eval's `_encode_pair`: trailing spaces move to the
continuation, the whole string is encoded once). acc takes the argmax of the sums; acc_norm divides each sum
by the choice's length in characters, as lm-eval does (= bytes for ASCII).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.hfdata import HFDataConfig, is_hf_source, iter_records
from lmforge.errors import DataError
from lmforge.infer.engine import GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.progress import Progress

CONTEXT_FIELDS = ("query", "ctx", "question", "goal", "context")


def read_jsonl(
    path: str | Path, limit: int | None = None, hf: HFDataConfig | None = None
) -> list[dict[str, Any]]:
    """A task's examples: a JSONL file, or a Hugging Face dataset's rows (data/hfdata.py)."""
    if not is_hf_source(path) and not Path(path).is_file():
        raise DataError(f"{Path(path)}: task file not found")
    rows: list[dict[str, Any]] = []
    for _, _, rec in iter_records(path, hf):
        rows.append(rec)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


# -- token-level scoring ---------------------------------------------------------------------------------
def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids; an empty context becomes [EOS]."""
    if context == "":
        cont = list(tok.encode(continuation))
        return [tok.eos_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tok.encode(context + continuation))
    ctx = list(tok.encode(context))
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def score_continuations(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_len: int,
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per pair.

    Sequences longer than max_len + 1 lose their oldest context tokens. Batches are length-sorted and
    right-padded (causal attention: padding after a row's tokens cannot change them).
    """
    device = next(model.parameters()).device
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise DataError(f"example {i}: empty continuation (nothing to score)")
        full = [*ctx, *cont][-(max_len + 1) :]
        items.append((i, full[:-1], min(len(cont), len(full) - 1)))
    order = sorted(items, key=lambda it: -len(it[1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        L = max(len(x) for _, x, _ in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, (_, inp, _) in enumerate(chunk):
            x[r, : len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(model(x.to(device)).float(), dim=-1)  # (B, L, V)
        for r, (i, inp, n) in enumerate(chunk):
            full = [*inp, pairs[i][1][-1]]
            tgt = torch.tensor(full[len(full) - n :], device=device)  # the continuation tokens
            rows = logp[r, len(inp) - n : len(inp)]  # (n, V): positions predicting them
            ll = float(rows.gather(-1, tgt[:, None]).sum())
            greedy = bool((rows.argmax(-1) == tgt).all())
            out[i] = (ll, greedy)
        if progress is not None:
            progress(len(chunk))
    return out


def _max_len(model: nn.Module) -> int:
    return int(getattr(model, "cfg", None).max_seq_len)  # type: ignore[union-attr]


# -- multiple choice -------------------------------------------------------------------------------------
def mc_requests(
    rows: list[dict[str, Any]],
    path: str | Path,
    *,
    choices_field: str,
    gold_field: str,
    context_field: str | None,
) -> list[tuple[str, list[str], int]]:
    """(context, choices, gold index) per example, with errors naming the file, line and field."""
    out = []
    for n, rec in enumerate(rows, 1):
        field = context_field or next((f for f in CONTEXT_FIELDS if f in rec), None)
        if field is None or not isinstance(rec.get(field), str):
            raise DataError(
                f"{path}: example {n}: no context field (expected one of {', '.join(CONTEXT_FIELDS)})"
            )
        choices = rec.get(choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}: example {n}: {choices_field!r} must be a list of >= 2 strings")
        gold = rec.get(gold_field)
        if isinstance(gold, str) and gold.isdigit():
            gold = int(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(
                f"{path}: example {n}: {gold_field!r} must be an index into the {len(choices)} choices"
            )
        out.append((rec[field], choices, gold))
    return out


def multiple_choice(
    model: nn.Module,
    tok: Any,
    path: str | Path,
    *,
    choices_field: str = "choices",
    gold_field: str = "gold",
    context_field: str | None = None,
    target_delimiter: str = " ",
    max_len: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Progress | None = None,
    hf: HFDataConfig | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    examples = mc_requests(
        read_jsonl(path, limit, hf),
        path,
        choices_field=choices_field,
        gold_field=gold_field,
        context_field=context_field,
    )
    pairs = [encode_pair(tok, ctx, target_delimiter + c) for ctx, choices, _ in examples for c in choices]
    if progress is not None:
        progress.set_total(len(pairs))
    scores = score_continuations(
        model,
        pairs,
        max_len=max_len or _max_len(model),
        batch_size=batch_size,
        progress=progress.advance if progress is not None else None,
    )
    acc = acc_norm = 0
    k = 0
    for _, choices, gold in examples:
        lls = [s for s, _ in scores[k : k + len(choices)]]
        k += len(choices)
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]
        acc += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        acc_norm += int(max(range(len(normed)), key=normed.__getitem__) == gold)
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "seconds": time.perf_counter() - t0}


# -- generation ------------------------------------------------------------------------------------------
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100); examples with fewer references repeat their first one, which
    changes nothing (clipping takes the max over references, the brevity penalty the closest length)."""
    import sacrebleu

    k = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else refs[0] for refs in references] for j in range(k)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of outputs equal (after strip) to one of their references."""
    hits = sum(h.strip() in {r.strip() for r in refs} for h, refs in zip(hypotheses, references, strict=True))
    return hits / max(len(hypotheses), 1)


def generation(
    engine: Any,
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    reference_field: str = "reference",
    max_tokens: int = 64,
    stop: Sequence[str] = ("\n",),
    temperature: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
    keep_outputs: int = 5,
    progress: Progress | None = None,
    hf: HFDataConfig | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = read_jsonl(path, limit, hf)
    prompts, refs = [], []
    for n, rec in enumerate(rows, 1):
        p, r = rec.get(prompt_field), rec.get(reference_field)
        if not isinstance(p, str):
            raise DataError(f"{path}: example {n}: {prompt_field!r} missing or not a string")
        if isinstance(r, str):
            r = [r]
        if not isinstance(r, list) or not r or not all(isinstance(x, str) for x in r):
            raise DataError(f"{path}: example {n}: {reference_field!r} must be a string or a list of strings")
        prompts.append(p)
        refs.append(r)
    params = SamplingParams(max_tokens=max_tokens, stop=list(stop), temperature=temperature, seed=seed)
    tok = engine.tokenizer
    reqs = [GenerationRequest(tok.encode(p) or [tok.eos_id], params) for p in prompts]
    if progress is not None:
        progress.set_total(len(reqs))
    hyps = [c.text for c in engine.generate(reqs, on_finish=progress.advance if progress else None)]
    return {
        "bleu": corpus_bleu(hyps, refs),
        "exact_match": exact_match(hyps, refs),
        "n": len(hyps),
        "seconds": time.perf_counter() - t0,
        "examples": [
            {"prompt": p, "output": h, "references": r}
            for p, h, r in list(zip(prompts, hyps, refs, strict=True))[:keep_outputs]
        ],
    }


__all__ = [
    "corpus_bleu",
    "encode_pair",
    "exact_match",
    "generation",
    "mc_requests",
    "multiple_choice",
    "read_jsonl",
    "score_continuations",
]
