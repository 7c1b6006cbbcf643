"""Cost of one progress update: lmforge.progress against tqdm and a bare rich Progress, and against nothing.

    .venv/bin/python -m benchmarks.progress [--updates 200000] [--repeat 3]

Each contender counts `--updates` updates of a 1-unit job into a stream that is not a terminal (/dev/null),
as a job under nohup or CI sees it: lmforge logs a line every LMFORGE_PROGRESS_INTERVAL seconds (10, the
default, and 0: a line per update), tqdm writes its own throttled lines (mininterval 0.1 s) and rich's
Progress updates its task (no live display off a terminal). The loop without progress is the baseline.
Best of --repeat, microseconds per update. Results go to benchmarks/results/progress.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.progress import INTERVAL_ENV, Progress

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "progress.json"


def bare(n: int) -> None:
    total = 0
    for i in range(n):
        total ^= i


def lmforge(interval: str) -> Callable[[int], None]:
    def run(n: int) -> None:
        os.environ[INTERVAL_ENV] = interval
        with open(os.devnull, "w") as sink, Progress("bench", n, "items", stream=sink) as bar:
            for _ in range(n):
                bar.advance()

    return run


def tqdm_run(n: int) -> None:
    from tqdm import tqdm

    with open(os.devnull, "w") as sink, tqdm(total=n, file=sink) as bar:
        for _ in range(n):
            bar.update(1)


def rich_run(n: int) -> None:
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    with open(os.devnull, "w") as sink, RichProgress(console=Console(file=sink)) as bar:
        task = bar.add_task("bench", total=n)
        for _ in range(n):
            bar.advance(task)


def best(fn: Callable[[int], None], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    return min(times) / n * 1e6  # microseconds per update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    contenders = {
        "no progress (baseline)": bare,
        "lmforge, log line every 10 s": lmforge("10"),
        "lmforge, log line every update": lmforge("0"),
        "tqdm 4.x (file not a terminal)": tqdm_run,
        "rich Progress (not a terminal)": rich_run,
    }
    us = {name: best(fn, args.updates, args.repeat) for name, fn in contenders.items()}
    ref = us["lmforge, log line every 10 s"]
    for name, v in us.items():
        print(f"{name:34s} {v:8.3f} us/update   {v / ref:6.2f}x lmforge (10 s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"updates": args.updates, "us_per_update": us, "machine": platform.platform()}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
