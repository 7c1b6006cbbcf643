"""`lmforge data feedback`: the server's feedback log (`serve` with feedback.enabled) -> preference pairs.

    lmforge data feedback input=feedback.jsonl output=runs/feedback-pairs
    lmforge align dpo model=runs/demo/pretrain data=runs/feedback-pairs/pairs.jsonl output=runs/dpo-fb

Writes `pairs.jsonl` in the format `align dpo` reads (data/preference.py): one
`{"prompt": text | messages, "chosen": str, "rejected": str}` per line, with `report.json` (the counts),
the config and a manifest. Events are grouped by their exact prompt (text, or the whole conversation):

- comparisons: each unordered pair of answers is decided by its votes (A over B vs B over A); the winner
  is chosen, the loser rejected; a tie gives no pair;
- ratings: an answer's score is its ups minus its downs; every answer above 0 is paired, as chosen, with
  every answer below 0 for the same prompt; a pair that comparisons already decided is not repeated;
- so every (prompt, answer, answer) appears at most once, in the order the prompts first appeared.

A malformed line stops the command naming file:line (a crash of an old writer can tear the last line);
`skip_bad=true` skips such lines and counts them in the report instead.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.config import ConfigPath, Section, parse_command, save_config
from lmforge.data.manifest import write_manifest
from lmforge.errors import DataError
from lmforge.io import atomic_write_json, atomic_write_text, staged_output

ROLES = ("system", "developer", "user", "assistant")


class FeedbackDataConfig(Section):
    input: ConfigPath = Field(..., description="the server's feedback log (serve feedback.path), JSON lines")
    output: ConfigPath = Field(..., description="output directory: pairs.jsonl, report.json")
    model: str | None = Field(None, description="keep only events for this served model id (default: all)")
    skip_bad: bool = Field(
        False, description="skip and count malformed lines instead of stopping at the first"
    )
    overwrite: bool = Field(False, description="replace an existing output directory")


@dataclass
class Prompt:
    """Everything recorded for one exact prompt."""

    value: Any  # the text, or the list of messages
    votes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (winner, loser)
    scores: dict[str, int] = field(default_factory=dict)  # answer -> ups - downs, in first-seen order


def _text(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v:
        raise DataError(f"{where}: {key!r} must be a non-empty string")
    return v


def _prompt(rec: dict[str, Any], where: str) -> Any:
    if ("prompt" in rec) == ("messages" in rec):
        raise DataError(f"{where}: expected exactly one of 'prompt' (text) or 'messages' (a chat)")
    if "prompt" in rec:
        return _text(rec, "prompt", where)
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def parse_event(rec: dict[str, Any], where: str) -> tuple[Any, str, Any]:
    """(prompt, kind, payload) of one log record: payload is (answer, +1|-1) or (winner, loser)."""
    prompt = _prompt(rec, where)
    kind = rec.get("kind")
    if kind == "rating":
        if rec.get("rating") not in ("up", "down"):
            raise DataError(f"{where}: 'rating' must be 'up' or 'down'")
        return prompt, kind, (_text(rec, "answer", where), 1 if rec["rating"] == "up" else -1)
    if kind == "comparison":
        answers, choice = rec.get("answers"), rec.get("choice")
        if not (
            isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
        ):
            raise DataError(f"{where}: 'answers' must be a list of two non-empty strings")
        if type(choice) is not int or choice not in (0, 1):
            raise DataError(f"{where}: 'choice' must be 0 or 1")
        if answers[0] == answers[1]:
            raise DataError(f"{where}: the two answers are identical")
        return prompt, kind, (answers[choice], answers[1 - choice])
    raise DataError(f"{where}: 'kind' must be 'rating' or 'comparison', got {str(kind)[:40]!r}")


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (the server's feedback.path)")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append((n, f"\0{e.reason}"))  # parsed below as a bad line
                continue
            if line.strip():
                out.append((n, line))
    return out


def read_log(path: Path, model: str | None, skip_bad: bool) -> tuple[dict[str, Prompt], dict[str, Any]]:
    """The log's events grouped by exact prompt (first-seen order), and the counts for the report."""
    counts: dict[str, Any] = {"events": 0, "ratings": 0, "comparisons": 0, "other_model": 0, "bad_lines": 0}
    bad: list[int] = []
    prompts: dict[str, Prompt] = {}
    for n, line in _lines(path):
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object per line")
            value, kind, payload = parse_event(rec, where)
        except (ValueError, DataError) as e:
            if not skip_bad:
                reason = e if isinstance(e, DataError) else f"{where}: not valid JSON"
                raise DataError(f"{reason} (skip_bad=true skips malformed lines)") from None
            bad.append(n)
            continue
        if model is not None and rec.get("model") != model:
            counts["other_model"] += 1
            continue
        counts["events"] += 1
        counts[kind + "s"] += 1
        p = prompts.setdefault(json.dumps(value, ensure_ascii=False, sort_keys=True), Prompt(value))
        if kind == "rating":
            p.scores[payload[0]] = p.scores.get(payload[0], 0) + payload[1]
        else:
            p.votes[payload] += 1
    counts["bad_lines"] = len(bad)
    counts["bad_line_numbers"] = bad[:20]
    return prompts, counts


def prompt_pairs(p: Prompt, counts: dict[str, int]) -> list[tuple[str, str]]:
    """(chosen, rejected) of one prompt: comparisons by majority, then ratings' good x bad answers."""
    pairs: list[tuple[str, str]] = []
    decided: set[frozenset[str]] = set()
    for a, b in list(p.votes):
        key = frozenset((a, b))
        if key in decided:
            continue
        decided.add(key)
        margin = p.votes.get((a, b), 0) - p.votes.get((b, a), 0)
        if margin == 0:
            counts["tied_comparisons"] += 1
        else:
            pairs.append((a, b) if margin > 0 else (b, a))
    counts["pairs_from_comparisons"] += len(pairs)
    good = [a for a, s in p.scores.items() if s > 0]
    bad = [a for a, s in p.scores.items() if s < 0]
    counts["tied_ratings"] += sum(1 for s in p.scores.values() if s == 0)
    from_ratings = [(g, b) for g in good for b in bad if frozenset((g, b)) not in decided]
    counts["pairs_from_ratings"] += len(from_ratings)
    if p.scores and not (good and bad):
        counts["unpaired_rated_prompts"] += 1
    return pairs + from_ratings


def build_pairs(prompts: dict[str, Prompt]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The preference rows in first-seen prompt order, and their counts."""
    counts = dict.fromkeys(
        ("pairs_from_comparisons", "pairs_from_ratings", "tied_comparisons", "tied_ratings"), 0
    )
    counts["unpaired_rated_prompts"] = 0
    rows = [
        {"prompt": p.value, "chosen": chosen, "rejected": rejected}
        for p in prompts.values()
        for chosen, rejected in prompt_pairs(p, counts)
    ]
    return rows, counts


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        FeedbackDataConfig,
        "data feedback",
        "Turn the server's feedback log (ratings and comparisons from the chat page or POST /v1/feedback) "
        "into preference pairs for align dpo: output/pairs.jsonl and output/report.json.",
        "lmforge data feedback input=feedback.jsonl output=runs/feedback-pairs",
    )
    prompts, report = read_log(Path(cfg.input), cfg.model, cfg.skip_bad)
    rows, counts = build_pairs(prompts)
    report.update(counts, prompts=len(prompts), pairs=len(rows))
    if not rows:
        raise DataError(
            f"{cfg.input}: no preference pairs ({report['events']} events: a pair needs a comparison, or an "
            "up and a down rating of two answers to the same prompt)"
        )
    with staged_output(Path(cfg.output), overwrite=cfg.overwrite, resume=False) as stage:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(stage / "pairs.jsonl", text)
        atomic_write_json(stage / "report.json", report)
        save_config(cfg, stage, "data feedback")
        write_manifest(stage, stage="data feedback")
    print(
        f"{report['events']} events ({report['ratings']} ratings, {report['comparisons']} comparisons, "
        f"{report['bad_lines']} bad lines skipped) over {report['prompts']} prompts -> {report['pairs']} pairs "
        f"({report['pairs_from_comparisons']} from comparisons, {report['pairs_from_ratings']} from ratings) "
        f"-> {Path(cfg.output) / 'pairs.jsonl'}"
    )
    return 0
