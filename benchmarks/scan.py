"""`lmforge data scan` throughput (MB/s of record text), whole scan and per detector.

    .venv/bin/python -m benchmarks.scan [--repeat 3]

1. The demo fine-tuning data: configs/finetune/data/dialogue-train.jsonl (SFT) and
   configs/align/data/shakespeare-prefs.jsonl (DPO pairs), every detector but perplexity (no reference model).
2. demo:shakespeare cut into ~1,000-character documents (the shape of a pretraining corpus): hidden Unicode
   and rare n-grams, the detectors that apply to plain documents.

Reading, classification and every detector are timed (best of --repeat, wall clock and CPU time); the report
writing of the CLI is not. Results go to benchmarks/results/scan.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from lmforge.data import scan as S
from lmforge.data.ingest import IngestConfig, RawDoc, expand_inputs, iter_documents

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scan.json"
DEMO = [
    str(ROOT / "configs/finetune/data/dialogue-train.jsonl"),
    str(ROOT / "configs/align/data/shakespeare-prefs.jsonl"),
]


def corpus_pieces(chars: int = 1000) -> list[S.Record]:
    out = []
    for item in iter_documents(expand_inputs(["demo:shakespeare"]), IngestConfig()):
        if isinstance(item, RawDoc):
            for k in range(0, len(item.text), chars):
                t = item.text[k : k + chars]
                out.append(S.Record(f"{item.id}:{k}", "document", t, {"text": t}, item.source))
    return out


def timed(fn: Any, repeat: int) -> tuple[float, float, Any]:
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu, result


def measure(name: str, load: Any, detectors: tuple[str, ...], repeat: int) -> dict[str, Any]:
    records = load()
    mb = sum(len(r.text.encode("utf-8")) for r in records) / 1e6
    opts = S.ScanOptions(detectors=detectors)
    wall, cpu, res = timed(lambda: S.scan(load(), opts), repeat)
    row: dict[str, Any] = {
        "records": len(records),
        "mb": round(mb, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "mb_per_s": round(mb / wall, 2),
        "mb_per_cpu_s": round(mb / cpu, 2),
        "flagged": len(res.flagged()),
        "per_detector_mb_per_s": {},
    }
    fns = {
        "hidden_unicode": S.detect_hidden_unicode,
        "rare_ngrams": S.detect_rare_ngrams,
        "trigger_response": S.detect_trigger_response,
        "swapped_pairs": S.detect_swapped_pairs,
    }
    for d in detectors:
        w, _, _ = timed(lambda d=d: fns[d](records, opts), repeat)
        row["per_detector_mb_per_s"][d] = round(mb / w, 2)
    print(f"{name}: {json.dumps(row)}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    all4 = ("hidden_unicode", "rare_ngrams", "trigger_response", "swapped_pairs")
    results = {
        "machine": f"{platform.machine()} {platform.python_version()}",
        "demo_sft_dpo": measure("demo SFT + DPO", lambda: S.read_records(DEMO), all4, args.repeat),
        "shakespeare_1k_docs": measure(
            "shakespeare 1k-char docs", corpus_pieces, ("hidden_unicode", "rare_ngrams"), args.repeat
        ),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
