"""`lmforge data scan`: the poisoning scan over documents, SFT and preference files (library: data/scan.py).

    lmforge data scan configs/finetune/data/dialogue-train.jsonl output=runs/scan
    lmforge data scan data/*.jsonl output=runs/scan drop=true reference=runs/demo/pretrain

Writes report.json and report.md (counts per detector, recurring patterns, examples with hidden characters
escaped and PII masked), config.yaml and manifest.json; with `drop=true` also clean/<input>.jsonl, the
records no detector flagged, one JSON object a line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from lmforge.config import (
    ConfigPath,
    ConfigRef,
    EncryptionConfig,
    Section,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.manifest import write_manifest
from lmforge.data.scan import DETECTORS, DetectorName, Record, ScanOptions, mean_losses, read_records, scan
from lmforge.data.scan_stage import build_report, render_markdown
from lmforge.device import pick_device
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_json, atomic_write_text, staged_output
from lmforge.model.source import load_model


class ScanConfig(Section):
    input: list[ConfigPath] = Field(
        default_factory=list,
        description="files, directories or globs to scan (also given as positional INPUTs)",
    )
    output: ConfigPath = Field(
        ..., description="output directory: report.json, report.md (+ clean/ with drop)"
    )
    drop: bool = Field(False, description="also write the records no detector flagged to output/clean/")
    overwrite: bool = Field(False, description="replace an existing output directory")
    detectors: list[DetectorName] = Field(
        list(DETECTORS), description="detectors to run (perplexity runs only with a reference model)"
    )
    text_field: str = Field("text", description="JSONL field holding a plain document's text")
    examples: int = Field(5, ge=0, description="examples per detector in the report")
    rare_min_docs: int = Field(5, ge=2, description="rare n-grams: documents an n-gram must recur in")
    rare_max_n: int = Field(3, ge=2, le=6, description="rare n-grams: longest n-gram in words")
    unrelated: float = Field(
        0.3, gt=0, le=1, description="records sharing a pattern must have a mean word Jaccard below this"
    )
    trigger_min_support: int = Field(
        3, ge=2, description="trigger->response: at least this many records with one response"
    )
    trigger_purity: float = Field(
        0.8,
        gt=0,
        le=1,
        description="trigger->response: share of prompts with the phrase that get the response",
    )
    swap_threshold: float = Field(
        0.6, gt=0, le=1, description="swapped pairs: prompt word Jaccard of near-duplicate prompts"
    )
    reference: ConfigRef | None = Field(None, description="reference model folder for perplexity outliers")
    ppl_z: float = Field(4.0, gt=0, description="perplexity: flag records whose robust z-score exceeds this")
    max_tokens: int = Field(256, ge=2, description="perplexity: tokens scored per record")
    device: str = Field("auto", description="device for the reference model: auto, cpu, cuda, cuda:N, mps")
    encryption: EncryptionConfig = encryption_field()


def options(cfg: ScanConfig) -> ScanOptions:
    return ScanOptions(
        detectors=tuple(cfg.detectors),
        rare_min_docs=cfg.rare_min_docs,
        rare_max_n=cfg.rare_max_n,
        unrelated=cfg.unrelated,
        trigger_min_support=cfg.trigger_min_support,
        trigger_purity=cfg.trigger_purity,
        swap_threshold=cfg.swap_threshold,
        ppl_z=cfg.ppl_z,
    )


def write_clean(stage: Path, records: list[Record], flagged: set[int]) -> dict[str, int]:
    """clean/<input file name>.jsonl per input: the unflagged records, in input order."""
    by_file: dict[str, list[str]] = {}
    for i, r in enumerate(records):
        rows = by_file.setdefault(r.file, [])
        if i not in flagged:
            rows.append(json.dumps(r.data, ensure_ascii=False))
    (stage / "clean").mkdir(exist_ok=True)
    kept: dict[str, int] = {}
    for n, (file, rows) in enumerate(by_file.items()):
        name = Path(file).name.removesuffix(".jsonl") + ".jsonl"
        name = f"{n}-{name}" if name in kept else name  # two inputs with one file name
        atomic_write_text(stage / "clean" / name, "".join(row + "\n" for row in rows))
        kept[name] = len(rows)
    return kept


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Positional INPUTs (no `=`, not an option) apart from the config arguments."""
    inputs, rest, after_c = [], [], False
    for a in argv:
        if after_c or a.startswith("-") or "=" in a:
            rest.append(a)
            after_c = a in ("-c", "--config")
        else:
            inputs.append(a)
    return inputs, rest


def main(argv: list[str]) -> int:
    inputs, rest = split_argv(argv)
    cfg = parse_command(
        rest,
        ScanConfig,
        "data scan",
        "Flag documents and fine-tuning records with backdoor-like patterns (INPUT... key=value).",
        "lmforge data scan configs/finetune/data/dialogue-train.jsonl output=runs/scan drop=true",
    )
    cfg.input = inputs + cfg.input
    if not cfg.input:
        raise ConfigError("input: give at least one file to scan (lmforge data scan INPUT... output=DIR)")
    start = time.perf_counter()
    records = read_records(cfg.input, cfg.text_field)
    losses = None
    if cfg.reference and "perplexity" in cfg.detectors:
        model, tok = load_model(cfg.reference, device=pick_device(cfg.device))
        losses = mean_losses([r.text for r in records], model, tok, cfg.max_tokens)
    res = scan(records, options(cfg), losses)
    size = sum(len(r.text.encode("utf-8")) for r in records)
    use_ppl = bool(cfg.reference) and "perplexity" in cfg.detectors
    report = build_report(
        list(cfg.detectors), cfg.examples, use_ppl, records, res, time.perf_counter() - start, size
    )
    with staged_output(Path(cfg.output), overwrite=cfg.overwrite, resume=False) as stage:
        if cfg.drop:
            report["clean"] = write_clean(stage, records, res.flagged())
        atomic_write_json(stage / "report.json", report)
        atomic_write_text(stage / "report.md", render_markdown(report))
        save_config(cfg, stage, "data scan")
        write_manifest(stage, stage="data scan")
    print(
        f"scanned {report['records']} records ({report['mb_per_s']} MB/s): {report['flagged']} flagged "
        + ", ".join(f"{d}={n}" for d, n in report["flagged_by_detector"].items())
        + f" -> {cfg.output}"
    )
    return 0
