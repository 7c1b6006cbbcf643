"""The poisoning scan's report (shared by `lmforge data scan` and `lmforge prepare`) and the scan as a stage of
prepare: the `scan:` section of its config, run over the documents prepare is about to write.

    lmforge prepare input=raw/ output=cur scan.enabled=true               # flag: "scan": [...] on each doc
    lmforge prepare input=raw/ output=cur scan.enabled=true scan.drop=true  # drop what the scan flags

In prepare the scan sees each document after cleaning, quality rules, PII masking, decontamination and
dedup (so a planted trigger is not hidden by the copies dedup removes, and examples are already masked),
in input order in the parent process: the output is the same for any `workers`. It holds the text of the
kept documents in memory (the rare n-gram detector counts across the whole corpus).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from lmforge.config import ConfigRef, Section
from lmforge.data.scan import DETECTORS, DetectorName, Record, ScanOptions, ScanResult, mean_losses, scan
from lmforge.device import pick_device
from lmforge.model.source import load_model

DOCUMENT_DETECTORS: list[DetectorName] = ["hidden_unicode", "rare_ngrams", "perplexity"]
DROP_RULE = "poisoning"  # the rule name of dropped documents in prepare's report


def build_report(
    detectors: list[str],
    examples: int,
    perplexity: bool,
    records: list[Record],
    res: ScanResult,
    seconds: float,
    size: int,
) -> dict[str, Any]:
    """report.json of a scan: counts per kind and detector, recurring patterns, examples (PII masked)."""
    counts = {d: len(res.flagged(d)) for d in detectors}
    shown_by: dict[str, list[dict[str, str]]] = {}
    for f in res.findings:
        shown = shown_by.setdefault(f.detector, [])
        if len(shown) < examples:
            shown.append({"source": records[f.record].source, "reason": f.reason, "example": f.example})
    kinds = Counter(r.kind for r in records)
    return {
        "records": len(records),
        "kinds": dict(sorted(kinds.items())),
        "flagged": len(res.flagged()),
        "flagged_by_detector": counts,
        "patterns": res.patterns,
        "examples": shown_by,
        "bytes": size,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 3),
        "perplexity": "on" if perplexity else "off (no reference model)",
    }


def render_markdown(r: dict[str, Any]) -> str:
    timing = f" in {r['seconds']} s ({r['mb_per_s']} MB/s)" if "seconds" in r else ""
    lines = [
        "# Poisoning scan",
        "",
        f"{r['records']} records ({', '.join(f'{n} {k}' for k, n in r['kinds'].items())}), "
        f"{r['flagged']} flagged; {r['bytes'] / 1e6:.2f} MB{timing}. Perplexity: {r['perplexity']}."
        + (f" Flagged documents {'dropped' if r['drop'] else 'kept, marked'}." if "drop" in r else ""),
        "",
        "| detector | records flagged |",
        "|---|---|",
        *(f"| {d} | {n} |" for d, n in r["flagged_by_detector"].items()),
    ]
    for det, pats in r["patterns"].items():
        if pats:
            lines += ["", f"## {det}: recurring patterns", ""]
            lines += [f"- `{json.dumps(p, ensure_ascii=False)}`" for p in pats[:20]]
    for det, shown in r["examples"].items():
        lines += ["", f"## {det}: examples", ""]
        for e in shown:
            body = [f"  {line}" for line in e["example"].replace("```", "'''").splitlines()]
            lines += [f"- `{e['source']}`: {e['reason']}", "", "  ```text", *body, "  ```"]
    return "\n".join(lines) + "\n"


class PrepareScanConfig(Section):
    enabled: bool = Field(False, description="run the poisoning scan on the documents prepare writes")
    drop: bool = Field(False, description='drop flagged documents (else keep them with "scan": [detectors])')
    detectors: list[DetectorName] = Field(
        list(DOCUMENT_DETECTORS),
        description="detectors (perplexity only with reference; the SFT/preference ones never fire on documents)",
    )
    examples: int = Field(5, ge=0, description="examples per detector in scan.json / scan.md")
    rare_min_docs: int = Field(5, ge=2, description="rare n-grams: documents an n-gram must recur in")
    rare_max_n: int = Field(3, ge=2, le=6, description="rare n-grams: longest n-gram in words")
    unrelated: float = Field(
        0.3, gt=0, le=1, description="documents sharing a pattern must have a mean word Jaccard below this"
    )
    reference: ConfigRef | None = Field(None, description="reference model folder for perplexity outliers")
    ppl_z: float = Field(
        4.0, gt=0, description="perplexity: flag documents whose robust z-score exceeds this"
    )
    max_tokens: int = Field(256, ge=2, description="perplexity: tokens scored per document")
    device: str = Field("auto", description="device for the reference model: auto, cpu, cuda, cuda:N, mps")


@dataclass
class StageScan:
    flags: dict[int, list[str]]  # prepare's document index -> the detectors that flagged it
    report: dict[str, Any]


def scan_documents(cfg: PrepareScanConfig, docs: Iterable[dict[str, Any]]) -> StageScan:
    """Scan prepare's final documents ({"i", "id", "source", "text"}, in order); flags by document index."""
    start = time.perf_counter()
    index: list[int] = []
    records: list[Record] = []
    for d in docs:
        index.append(int(d["i"]))
        records.append(Record(d["id"], "document", d["text"], {}, d["source"]))
    use_ppl = bool(cfg.reference) and "perplexity" in cfg.detectors
    losses = None
    if use_ppl and records:
        assert cfg.reference is not None
        model, tok = load_model(cfg.reference, device=pick_device(cfg.device))
        losses = mean_losses([r.text for r in records], model, tok, cfg.max_tokens)
    opts = ScanOptions(
        detectors=tuple(cfg.detectors),
        rare_min_docs=cfg.rare_min_docs,
        rare_max_n=cfg.rare_max_n,
        unrelated=cfg.unrelated,
        ppl_z=cfg.ppl_z,
    )
    res = scan(records, opts, losses) if records else ScanResult(0)
    flags: dict[int, list[str]] = {}
    for f in res.findings:
        got = flags.setdefault(index[f.record], [])
        if f.detector not in got:
            got.append(f.detector)
    size = sum(len(r.text.encode("utf-8")) for r in records)
    report = build_report(
        list(cfg.detectors), cfg.examples, use_ppl, records, res, time.perf_counter() - start, size
    )
    report["drop"] = cfg.drop
    for timing in ("seconds", "mb_per_s"):  # prepare's output is byte-identical across runs: no clock
        report.pop(timing)
    return StageScan({i: sorted(v) for i, v in sorted(flags.items())}, report)


__all__ = [
    "DETECTORS",
    "DOCUMENT_DETECTORS",
    "DROP_RULE",
    "PrepareScanConfig",
    "StageScan",
    "build_report",
    "render_markdown",
    "scan_documents",
]
