"""`lmforge prepare` throughput on the demo corpus (1 and 2 workers), and MinHash speed: rensa vs datasketch.

    .venv/bin/python -m benchmarks.prepare [--repeat 2] [--minhash-docs 10000]

1. Runs the full prepare pipeline (configs/demo/prepare.yaml: normalise, boilerplate, quality rules, PII,
   MinHash LSH dedup, zstd shards, report, manifest) on demo:shakespeare with workers=1 and workers=2 and
   prints docs/s and MB/s (wall clock; best of --repeat), plus the speedup of 2 workers over 1. It also
   checks that both produce byte-identical shards.
2. MinHash signatures (128 permutations, word 5-gram shingles) of the same documents with rensa's RMinHash
   (what lmforge uses) and datasketch's MinHash.bulk (its fast path): the Shakespeare corpus cut into
   ~1,000-character pieces, and the 77 whole texts. Shingles are prepared once and shared, so only hashing
   is compared; lmforge's `signature()` (tokenise + shingle + hash, as prepare runs it) is timed too. The
   estimation error of each library against the exact Jaccard is measured on 300 overlapping pairs.

The machine is shared with other jobs, so absolute numbers move between runs; the ratios are measured in one
run on the same data. Results go to benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lmforge.config import load_config
from lmforge.data.dedup import DedupConfig, shingles, signature
from lmforge.data.demo import demo_files
from lmforge.data.prepare import PrepareConfig, run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo" / "prepare.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "prepare.json"


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the worker pool is joined inside run())."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_prepare(workers: int, repeat: int, tmp: Path) -> dict[str, Any]:
    best = None
    out = tmp / f"w{workers}"
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(PrepareConfig, CONFIG, [f"output={out}", f"workers={workers}"], command="prepare")
        c0 = _cpu()
        t0 = time.perf_counter()
        report = run(cfg, quiet=True)
        dt = time.perf_counter() - t0
        if best is None or dt < best:
            best, cpu = dt, _cpu() - c0
    assert best is not None
    docs, nbytes = report["documents"]["in"], report["bytes"]["in"]
    return {
        "workers": workers,
        "seconds": round(best, 3),
        # CPU of this process and its reaped children; forkserver workers are not our children, so with
        # workers=1 this is the whole cost of the run and with workers>1 only the parent's share.
        "parent_cpu_seconds": round(cpu, 3),
        "docs": docs,
        "mb": round(nbytes / 1e6, 3),
        "docs_per_s": round(docs / best, 2),
        "mb_per_s": round(nbytes / 1e6 / best, 3),
        "docs_out": report["documents"]["out"],
        "shards": sorted(p.name for p in out.glob("docs-*")),
    }


def pieces(n: int) -> list[str]:
    text = "\n".join(p.read_text("utf-8") for p, _ in demo_files("demo:shakespeare"))
    size = 1000
    out = [text[i : i + size] for i in range(0, len(text), size)]
    return out[:n]


def bench_minhash(docs: list[str], num_perm: int = 128, accuracy: bool = True) -> dict[str, Any]:
    import numpy as np
    from datasketch import MinHash
    from rensa import RMinHash

    cfg = DedupConfig(num_perm=num_perm, shingle="word", ngram=5)
    t0 = time.perf_counter()
    for d in docs:  # end to end as prepare does it: tokenise, shingle, hash
        signature(d, cfg)
    t_sig = time.perf_counter() - t0
    toks = [shingles(d, cfg) for d in docs]
    toks_b = [[t.encode("utf-8") for t in ts] for ts in toks]

    t0 = time.perf_counter()
    rs = []
    for ts in toks:
        m = RMinHash(num_perm=num_perm, seed=1)
        m.update(ts)
        rs.append(m)
    t_rensa = time.perf_counter() - t0

    # datasketch's fast path: MinHash.bulk builds the permutations once for all documents (a plain
    # MinHash() per document re-draws them each time and is several times slower)
    t0 = time.perf_counter()
    ds = MinHash.bulk(toks_b, num_perm=num_perm, seed=1)
    t_ds = time.perf_counter() - t0
    assert len(ds) == len(docs)

    # accuracy on pairs with real overlap: a piece and the same text shifted by 100-700 characters
    rng = np.random.default_rng(0)
    text = "".join(docs)
    err_r: list[float] = []
    err_d: list[float] = []
    for start in rng.integers(0, len(text) - 3000, 300 if accuracy else 0):
        shift = int(rng.integers(100, 700))
        a, b = text[start : start + 2000], text[start + shift : start + shift + 2000]
        sa, sb = set(shingles(a, cfg)), set(shingles(b, cfg))
        exact = len(sa & sb) / len(sa | sb)
        ra, rb = RMinHash(num_perm=num_perm, seed=1), RMinHash(num_perm=num_perm, seed=1)
        ra.update(sorted(sa))
        rb.update(sorted(sb))
        da, db = MinHash(num_perm=num_perm, seed=1), MinHash(num_perm=num_perm, seed=1)
        da.update_batch([s.encode() for s in sorted(sa)])
        db.update_batch([s.encode() for s in sorted(sb)])
        err_r.append(abs(ra.jaccard(rb) - exact))
        err_d.append(abs(da.jaccard(db) - exact))
    return {
        "docs": len(docs),
        "num_perm": num_perm,
        "shingles": "word 5-grams",
        "rensa_docs_per_s": round(len(docs) / t_rensa, 1),
        "datasketch_docs_per_s": round(len(docs) / t_ds, 1),
        "rensa_over_datasketch": round(t_ds / t_rensa, 2),
        "lmforge_signature_docs_per_s_incl_shingling": round(len(docs) / t_sig, 1),
        "shingles_per_doc": round(sum(map(len, toks)) / len(toks), 1),
        "mean_abs_jaccard_error": None
        if not accuracy
        else {
            "rensa": round(float(np.mean(err_r)), 4),
            "datasketch": round(float(np.mean(err_d)), 4),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--minhash-docs", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        p1 = bench_prepare(1, args.repeat, Path(tmp))
        p2 = bench_prepare(2, args.repeat, Path(tmp))
        same = (
            all(
                (Path(tmp) / "w1" / s).read_bytes() == (Path(tmp) / "w2" / s).read_bytes()
                for s in p1["shards"]
            )
            and p1["shards"] == p2["shards"]
        )
    mh = bench_minhash(pieces(args.minhash_docs))
    plays = [p.read_text("utf-8") for p, _ in demo_files("demo:shakespeare")]
    mh_long = bench_minhash(plays, accuracy=False)
    result = {
        "mb_per_cpu_second_1_worker": round(p1["mb"] / p1["parent_cpu_seconds"], 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "prepare_demo_shakespeare": {"workers_1": p1, "workers_2": p2},
        "prepare_speedup_2_over_1": round(p1["seconds"] / p2["seconds"], 2),
        "outputs_byte_identical": same,
        "minhash": mh,
        "minhash_whole_plays": mh_long,
        "command": ".venv/bin/python -m benchmarks.prepare",
    }
    print(f"prepare demo:shakespeare ({p1['docs']} docs, {p1['mb']} MB -> {p1['docs_out']} docs):")
    for p in (p1, p2):
        print(
            f"  workers={p['workers']}: {p['seconds']:.2f} s wall ({p['parent_cpu_seconds']:.2f} s CPU in the parent), "
            f"{p['docs_per_s']:.1f} docs/s, {p['mb_per_s']:.2f} MB/s"
        )
    print(f"  2 workers / 1 worker: {result['prepare_speedup_2_over_1']}x; byte-identical outputs: {same}")
    print(
        f"MinHash ({mh['docs']} docs, {mh['num_perm']} perms, {mh['shingles']}): rensa {mh['rensa_docs_per_s']:,} "
        f"docs/s, datasketch {mh['datasketch_docs_per_s']:,} docs/s -> {mh['rensa_over_datasketch']}x; "
        f"mean |J error| rensa {mh['mean_abs_jaccard_error']['rensa']}, datasketch "
        f"{mh['mean_abs_jaccard_error']['datasketch']}; lmforge signature() incl. shingling "
        f"{mh['lmforge_signature_docs_per_s_incl_shingling']:,} docs/s"
    )
    print(
        f"MinHash on the 77 whole texts ({mh_long['shingles_per_doc']:,.0f} shingles each): rensa "
        f"{mh_long['rensa_docs_per_s']:,} docs/s, datasketch {mh_long['datasketch_docs_per_s']:,} docs/s -> "
        f"{mh_long['rensa_over_datasketch']}x"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
