"""The code reward's sandbox on this CPU: what isolation costs per completion.

    .venv/bin/python -m benchmarks.sandbox

Same code, tests and machine for all contenders: the 8 tasks of configs/rl/data/code-tasks.jsonl, each
reference solution run against its tests (all pass). Contenders:
  bare        `subprocess.run([python, "-I", "-c", code + tests])`: no limits, no isolation (the floor)
  process     `run_tests(..., mode="process")`: rlimits, own uid as root, empty env, verdict pipe
  namespace   `run_tests(..., mode="namespace")`: the same inside network + PID + mount namespaces
and `CodeReward` over 16 completions with workers=1 and workers=2 (the default). Rounds alternate the
contenders, so a shared machine's load falls on all alike; each number is the median over the rounds of
the mean wall milliseconds per completion, and the children's CPU milliseconds per completion (user + sys,
from `resource.getrusage(RUSAGE_CHILDREN)`, which the shared machine's other jobs do not inflate).
Output: a table with ratios against `bare`, and benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from lmforge.train import sandbox
from lmforge.train.sandbox import CodeReward, run_tests

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "configs/rl/data/code-tasks.jsonl"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bare(rows: list[dict[str, Any]], python: str) -> None:
    for row in rows:
        done = subprocess.run([python, "-I", "-c", row["solution"] + "\n" + row["tests"]], env={}, timeout=30)
        assert done.returncode == 0


def _sandboxed(rows: list[dict[str, Any]], mode: str) -> None:
    for row in rows:
        result = run_tests(row["solution"], row["tests"], mode=mode)  # type: ignore[arg-type]
        assert result.passed, result


def _reward(rows: list[dict[str, Any]], workers: int) -> None:
    reward = CodeReward(workers=workers)
    batch = rows + rows
    scores = reward(["p"] * len(batch), [f"```python\n{r['solution']}```" for r in batch], batch)
    assert scores == [1.0] * len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sandbox.json")
    args = parser.parse_args()
    rows = [json.loads(line) for line in TASKS.read_text().splitlines()]
    python = sandbox.isolation("process").python  # the same interpreter for the floor
    contenders: dict[str, tuple[Any, int]] = {
        "bare": (lambda: _bare(rows, python), len(rows)),
        "process": (lambda: _sandboxed(rows, "process"), len(rows)),
        "namespace": (lambda: _sandboxed(rows, "namespace"), len(rows)),
        "reward_workers1": (lambda: _reward(rows, 1), 2 * len(rows)),
        "reward_workers2": (lambda: _reward(rows, 2), 2 * len(rows)),
    }
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, (run, n) in contenders.items():
            c0, t0 = _children_cpu(), time.perf_counter()
            run()
            wall[name].append((time.perf_counter() - t0) / n * 1e3)
            cpu[name].append((_children_cpu() - c0) / n * 1e3)
    results = {
        name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])}
        for name in wall
    }
    base = results["bare"]
    print(f"{'contender':<18} {'wall ms/completion':>19} {'x bare':>7} {'child CPU ms':>13} {'x bare':>7}")
    for name, r in results.items():
        r["wall_x_bare"] = r["wall_ms"] / base["wall_ms"]
        r["cpu_x_bare"] = r["cpu_ms"] / base["cpu_ms"]
        print(
            f"{name:<18} {r['wall_ms']:>19.1f} {r['wall_x_bare']:>7.2f} {r['cpu_ms']:>13.1f} {r['cpu_x_bare']:>7.2f}"
        )
    meta = {
        "python": python,
        "isolation": str(sandbox.isolation()),
        "rounds": args.rounds,
        "cpu": platform.processor(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
