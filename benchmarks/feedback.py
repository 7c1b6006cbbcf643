"""The feedback log's write path on this machine: fsynced JSON lines against SQLite (WAL, synchronous=FULL).

    .venv/bin/python -m benchmarks.feedback

What `POST /v1/feedback` pays per event after validation, and what the alternative would: the same
records (a 2-message chat, a ~400-character answer, as the chat page sends), each made durable before
the next is acknowledged. Contenders:
  jsonl_fsync      lmforge's FeedbackLog.append: one os.write on an O_APPEND fd + os.fsync, under a lock
  sqlite_full      sqlite3, journal_mode=WAL, synchronous=FULL, one INSERT + COMMIT per event, under a lock
                   (one connection shared by the threads, as a server would hold it)
  jsonl_no_fsync   the same line written and flushed but not fsynced: what durability itself costs
Each is run with 1 writer thread and with 8 (the server's to_thread pool under concurrent requests), for
`--events` events, alternating contender by contender for `--reps` rounds so the shared machine's load
falls on all alike; reported: the median events/s over the rounds and the per-event latency p50/p99 of
the median round. Output: a table with ratios, and benchmarks/results/feedback.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmforge.serve.feedback import FeedbackLog

ROOT = Path(__file__).resolve().parents[1]


def records(n: int) -> list[dict[str, Any]]:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me of the sea."}]
    return [
        {
            "id": f"fb-{i:032x}",
            "time": "2026-12-03T10:00:00.000Z",
            "kind": "rating",
            "model": "demo",
            "request_id": None,
            "key": "key-0123456789abcdef",
            "messages": chat,
            "answer": f"{i}: " + "The sea, the sea, that rolls upon the shore. " * 9,
            "rating": "up" if i % 2 else "down",
        }
        for i in range(n)
    ]


class SqliteLog:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        self.lock = threading.Lock()

    def append(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO feedback VALUES (?, ?)", (rec["id"], json.dumps(rec)))
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class BufferedLog:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.lock = threading.Lock()

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()

    def close(self) -> None:
        self.f.close()


MAKERS = {
    "jsonl_fsync": lambda d: FeedbackLog(d / "feedback.jsonl"),
    "sqlite_full": lambda d: SqliteLog(d / "feedback.sqlite"),
    "jsonl_no_fsync": lambda d: BufferedLog(d / "feedback-nofsync.jsonl"),
}


def run_one(name: str, recs: list[dict[str, Any]], threads: int, where: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        log = MAKERS[name](Path(tmp))
        lat: list[float] = []

        def one(rec: dict[str, Any]) -> None:
            t = time.perf_counter()
            log.append(rec)
            lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, recs))
        secs = time.perf_counter() - t0
        log.close()
    lat.sort()
    return {
        "events_per_s": len(recs) / secs,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=400, help="events per run")
    p.add_argument("--reps", type=int, default=5, help="rounds (contenders alternate within each)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the logs are written")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "feedback.json")
    args = p.parse_args()
    recs = records(args.events)
    runs: dict[str, list[dict[str, float]]] = {f"{n}/{t}": [] for t in (1, 8) for n in MAKERS}
    for rep in range(args.reps):
        for key in runs:
            name, threads = key.split("/")
            r = run_one(name, recs, int(threads), args.dir)
            runs[key].append(r)
            print(f"round {rep + 1} {key}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
    table: dict[str, dict[str, float]] = {}
    for key, rs in runs.items():
        median = sorted(rs, key=lambda r: r["events_per_s"])[len(rs) // 2]  # the median round
        table[key] = {**median, "events_per_s": round(statistics.median(r["events_per_s"] for r in rs), 1)}
    for t in (1, 8):
        base = table[f"jsonl_fsync/{t}"]["events_per_s"]
        for n in MAKERS:
            table[f"{n}/{t}"]["vs_jsonl_fsync"] = round(table[f"{n}/{t}"]["events_per_s"] / base, 2)
    print("\n| writer / threads | events/s | p50 ms | p99 ms | vs jsonl_fsync |\n|---|---|---|---|---|")
    for key, r in table.items():
        print(
            f"| {key} | {r['events_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['vs_jsonl_fsync']} |"
        )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "events": args.events,
        "reps": args.reps,
        "dir": str(args.dir),
        "record_bytes": len(json.dumps(recs[0])),
        "results": table,
        "rounds": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
