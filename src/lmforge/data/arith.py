"""A verifiable task for the RL demo: multi-digit addition, generated from a seed.

    task = make_task(seed=0, digits=2, n_train=2000, n_heldout=200, n_sft=500)
    write_task(task, Path("runs/demo-rl/data"))     # prompts.jsonl, heldout.jsonl, sft.jsonl, tokenizer/
    accuracy(["46", " 47"], ["46", "46"])           # 0.5: exact match after strip, like eval's generation task
    compare(before_report, after_report)            # held-out accuracy before/after from two eval reports

A problem is `{"prompt": "12+34=", "answer": "46"}`: the same record is a GRPO prompt row (its `answer`
field is what the `exact_match` / `numeric_match` rewards check) and an `lmforge eval` generation example
(`reference_field: answer`). The SFT file holds `{"prompt", "completion"}` pairs drawn from the training
pairs only, so no held-out sum is ever seen in training. Pairs are unique and the held-out split is
disjoint from the training split by (a, b); the same seed gives byte-identical files.

The tokenizer is byte-level with no merges (one token per character): a digit is always one token, so
the model sees the place values a BPE merge like "12" would hide.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_text
from lmforge.tokenizer import SpecialTokensConfig, Tokenizer, train_tokenizer

PROMPTS, HELDOUT, SFT, TOKENIZER = "prompts.jsonl", "heldout.jsonl", "sft.jsonl", "tokenizer"


@dataclass(frozen=True)
class Task:
    train: list[tuple[int, int]]  # GRPO prompts (and the SFT pairs are the first n_sft of them)
    heldout: list[tuple[int, int]]
    n_sft: int


def problem(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def _operand_range(digits: int, min_digits: int) -> tuple[int, int]:
    if not 1 <= min_digits <= digits:
        raise ConfigError(f"min_digits: expected 1 <= min_digits <= digits ({digits}), got {min_digits}")
    return (0 if min_digits == 1 else 10 ** (min_digits - 1)), 10**digits - 1


def make_task(
    *, seed: int, digits: int, n_train: int, n_heldout: int, n_sft: int, min_digits: int = 1
) -> Task:
    """Unique (a, b) pairs with operands of min_digits..digits digits, split train / held-out."""
    lo, hi = _operand_range(digits, min_digits)
    space = (hi - lo + 1) ** 2
    if n_train + n_heldout > space:
        raise ConfigError(
            f"n_train + n_heldout: {n_train + n_heldout} problems asked, but operands of "
            f"{min_digits}..{digits} digits give only {space} distinct pairs"
        )
    if n_sft > n_train:
        raise ConfigError(f"n_sft: expected at most n_train ({n_train}), got {n_sft}")
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set: the order depends on the seed only
    while len(pairs) < n_train + n_heldout:
        pairs[(rng.randint(lo, hi), rng.randint(lo, hi))] = None
    ordered = list(pairs)
    return Task(train=ordered[:n_train], heldout=ordered[n_train:], n_sft=n_sft)


def byte_tokenizer() -> Tokenizer:
    """256 byte symbols + the default special tokens, no merges (one token per character)."""
    special = SpecialTokensConfig()
    return train_tokenizer(["0"], vocab_size=len(special.ordered()) + 256, special_tokens=special)


def _jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_task(task: Task, out: Path) -> dict[str, int]:
    """The three JSONL files and the tokenizer folder in `out`; returns the row counts."""
    out.mkdir(parents=True, exist_ok=True)
    sft = [problem(a, b) for a, b in task.train[: task.n_sft]]
    atomic_write_text(out / PROMPTS, _jsonl([problem(a, b) for a, b in task.train]))
    atomic_write_text(out / HELDOUT, _jsonl([problem(a, b) for a, b in task.heldout]))
    atomic_write_text(out / SFT, _jsonl([{"prompt": r["prompt"], "completion": r["answer"]} for r in sft]))
    byte_tokenizer().save(out / TOKENIZER)
    return {"train": len(task.train), "heldout": len(task.heldout), "sft": len(sft)}


def accuracy(outputs: list[str], answers: list[str]) -> float:
    """Fraction of outputs equal to their answer after stripping whitespace (eval's exact_match rule)."""
    if len(outputs) != len(answers):
        raise DataError(f"accuracy: {len(outputs)} outputs for {len(answers)} answers")
    return sum(o.strip() == a.strip() for o, a in zip(outputs, answers, strict=True)) / max(len(outputs), 1)


def task_accuracy(report: dict[str, Any], where: str, task: str) -> tuple[float, int]:
    """(exact_match, n) of the generation task named `task` in an `lmforge eval` report.json."""
    for t in report.get("tasks", []):
        if t.get("name") == task:
            m = t.get("metrics", {})
            if not isinstance(m.get("exact_match"), (int, float)):
                raise DataError(f"{where}: task {task!r} has no exact_match metric (a generation task?)")
            return float(m["exact_match"]), int(m.get("n", 0))
    names = [t.get("name") for t in report.get("tasks", [])]
    raise DataError(f"{where}: no task named {task!r} (tasks: {names})")


def compare(
    before: dict[str, Any], after: dict[str, Any], task: str, where: tuple[str, str]
) -> dict[str, Any]:
    """Held-out accuracy before and after, and the gain in percentage points."""
    acc0, n0 = task_accuracy(before, where[0], task)
    acc1, n1 = task_accuracy(after, where[1], task)
    if n0 != n1:
        raise DataError(
            f"{where[1]}: {n1} held-out examples, but {where[0]} has {n0}; evaluate the same file"
        )
    return {
        "task": task,
        "n": n0,
        "before": {"model": before.get("model"), "accuracy": acc0},
        "after": {"model": after.get("model"), "accuracy": acc1},
        "gain_points": round(100 * (acc1 - acc0), 2),
    }


__all__ = [
    "HELDOUT",
    "PROMPTS",
    "SFT",
    "TOKENIZER",
    "Task",
    "accuracy",
    "byte_tokenizer",
    "compare",
    "make_task",
    "problem",
    "task_accuracy",
    "write_task",
]
