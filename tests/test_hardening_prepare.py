"""No raw PII in any output of `lmforge prepare`: documents dropped by each quality rule, the word list,
exact and near dedup and decontamination are sampled into report.json/report.md masked like kept ones."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import zstandard

from lmforge.cli import main

PII = {
    "email": "jane.doe@example.com",
    "phone": "+44 20 7946 0958",
    "iban": "DE89 3704 0044 0532 0130 00",
    "card": "4111 1111 1111 1111",
    "secret": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
}
PROSE = (
    "The committee met on Tuesday and approved the budget for the new library wing after a long "
    "and careful discussion of the costs, the schedule and the needs of the readers in town"
)
EVAL = "the quick brown fox jumps over the lazy dog near the river bank today"


def _docs(item: str, n: int) -> dict[str, str]:
    """One document per drop rule (and a kept one), each carrying the PII `item`."""
    return {
        "too_short": f"See {item}",
        "too_long": f"{PROSE} {item}. " + (PROSE + ". ") * 20,
        "few_words": f"Supercalifragilisticexpialidocious{n} " * 3 + f"{item} " + "Antidisestablishment " * 2,
        "alpha_ratio": f"{PROSE[:60]} {item}, then: "
        + "31415 92653 58979 32384 62643 38327 95028 84197 " * 4,
        "symbol_ratio": f"{PROSE} {item} " + "~~~~ ^^^^ |||| {{{{ }}}} ==== ++++ ",
        "repeated_lines": f"{item} is the contact\n" + "the same line again and again here\n" * 8,
        "wordlist": f"{PROSE}, a forbidden topic for number {n}, write to {item}.",
        "contaminated": f"Number {n} said {EVAL} and wrote to {item} about it all.",
        "exact_a": f"Exact copy {n}: {PROSE}, contact {item}.",
        "exact_b": f"Exact copy {n}: {PROSE}, contact {item}.",
        "near_a": f"Near copy {n} of the minutes: {PROSE} and more, contact {item} please.",
        "near_b": f"Near copy {n} of the minutes: {PROSE} and more, contact {item} now.",
        "kept": f"Kept number {n} says hello and a plain description of a quiet walk, mail {item}.",
    }


def _contents(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
            out[str(p)] = data.decode("utf-8")
    return out


def test_no_raw_pii_in_any_output_file(tmp_path: Path) -> None:
    lines = [json.dumps({"text": t}) for n, item in enumerate(PII.values()) for t in _docs(item, n).values()]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.txt").write_text(EVAL + "\n")
    (tmp_path / "words.txt").write_text("forbidden\n")
    out = tmp_path / "curated"
    args = [
        f"input={raw}",
        f"output={out}",
        "quality.min_chars=40",
        "quality.max_chars=1500",
        "quality.min_words=12",
        "report.sample_size=1000",
        "report.sample_chars=5000",
        f"filter.words_file={tmp_path / 'words.txt'}",
        f"decontam.eval_files=[{tmp_path / 'eval.txt'}]",
        "decontam.ngram=8",
        "dedup.threshold=0.7",
    ]
    assert main(["prepare", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    dropped = report["documents"]["dropped"]
    rules = [r for r in dropped if r not in ("exact_duplicate", "near_duplicate")]
    assert {r: dropped[r] for r in rules} == {r: 5 for r in rules}  # every rule dropped its 5 documents
    # (masked, the kept documents of the five kinds are near duplicates of each other too)
    assert dropped["exact_duplicate"] >= 5 and dropped["near_duplicate"] >= 5
    sampled = {s["id"] for s in report["sample"]["dropped"]}
    assert len(sampled) == sum(dropped.values())  # every dropped document is in the report
    reasons = Counter(x["reason"] for x in report["sample"]["dropped"])
    assert reasons == {r: d for r, d in dropped.items() if d}
    files = _contents(out)
    assert any(p.endswith("report.md") for p in files) and any(p.endswith(".zst") for p in files)
    for path, text in files.items():
        for kind, item in PII.items():
            assert item not in text, f"raw {kind} in {path}"
    assert "<EMAIL>" in files[str(out / "report.md")] and "<IBAN>" in files[str(out / "report.json")]
    # PII counts are of documents that passed the rules (the 6 of each kind through dedup), as before
    assert report["pii"]["docs"] == 5 * 6
