"""Score a JSONL of responses with a reward model (`lmforge eval reward_model=DIR data=FILE`).

One record per line: {"prompt": str | messages, "response": str}, other fields kept out of the report.
The result: n, mean, std (population), min, max and every row's score in file order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.io import iter_jsonl
from lmforge.model.reward import Prompt, RewardModel, encode_scored, score_ids
from lmforge.progress import Progress
from lmforge.tokenizer import Tokenizer


def read_responses(path: Path, tok: Tokenizer, prompt_field: str, response_field: str) -> list[list[int]]:
    """Each record's prompt + response as token ids; a DataError naming file:line for a bad record."""
    rows: list[list[int]] = []
    for line, rec in iter_jsonl(path):
        where = f"{path}:{line}"
        for key in (prompt_field, response_field):
            if key not in rec:
                raise DataError(
                    f"{where}: missing key {key!r}; expected {{{prompt_field!r}, {response_field!r}}}"
                )
        prompt: Prompt = rec[prompt_field]
        response = rec[response_field]
        if not isinstance(prompt, (str, list)) or not isinstance(response, str):
            raise DataError(f"{where}: {prompt_field!r} must be text or messages and {response_field!r} text")
        try:
            rows.append(encode_scored(tok, prompt, response))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def score_responses(
    model: RewardModel,
    tok: Tokenizer,
    data: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    batch_size: int = 8,
) -> dict[str, Any]:
    rows = read_responses(Path(data), tok, prompt_field, response_field)
    scores: list[float] = []
    with Progress("eval reward", len(rows), "responses") as bar:
        for i in range(0, len(rows), batch_size):
            scores += score_ids(model, rows[i : i + batch_size], batch_size)
            bar.advance(len(rows[i : i + batch_size]))
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return {
        "n": len(scores),
        "mean": mean,
        "std": std,
        "min": min(scores),
        "max": max(scores),
        "scores": scores,
    }


__all__ = ["read_responses", "score_responses"]
