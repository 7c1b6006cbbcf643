"""`lmforge sweep` backends: Ray Tune (`backend: ray`) against Optuna on the same tiny sweep, overhead per trial.

    .venv/bin/python -m benchmarks.sweep_ray --rounds 2 --trials 4

Both backends run the same sweep file (a 1-layer, width-32 Llama pretrained for 10 steps on tokens built
here from the bundled Shakespeare text; random sampler, seed 0, no pruner, one trial at a time), so every
trial trains the same amount. Rounds alternate optuna, ray, optuna, ray on the same machine (shared and
noisy). Per sweep: wall time, the trials' own time (each trial's `seconds`: its trainer subprocess, from
start to exit) and the rest, the backend's overhead, per trial; the Ray sweep's wall includes starting and
stopping its local Ray. Output: benchmarks/results/sweep_ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BASE = {
    "command": "pretrain",
    "model": "tiny",
    "model_overrides": {"dim": 32, "n_layers": 1},
    "seq_len": 32,
    "global_batch": 4,
    "micro_batch": 4,
    "max_steps": 10,
    "optim": {"lr": 1e-3},
    "eval": {"every": 5, "batches": 2, "batch_size": 4, "sample_tokens": 0},
    "log_every": 1,
    "progress": False,
    "tensorboard": False,
    "checkpoint": {"every": 0},
    "threads": 1,
}


def sweep_file(work: Path, tokens: Path, backend: str, trials: int) -> Path:
    base = work / "base.yaml"
    base.write_text(yaml.safe_dump({**BASE, "data": str(tokens), "output": "unused"}))
    cfg = {
        "command": "sweep",
        "output": str(work / "sweep"),
        "train": {"command": "pretrain", "config": str(base), "fixed": {"schedule.warmup_steps": 2}},
        "params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True}},
        "trials": trials,
        "sampler": "random",
        "pruner": {"kind": "none"},
        "poll_s": 0.1,
        "backend": backend,
        "ray_resources": {"cpu": 1},
    }
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_sweep(root: Path, tokens: Path, backend: str, trials: int, index: int) -> dict[str, Any]:
    work = root / f"{index:02d}-{backend}"
    work.mkdir(parents=True)
    path = sweep_file(work, tokens, backend, trials)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmforge", "sweep", "-c", str(path)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{backend} sweep failed:\n{done.stderr[-3000:]}")
    rows = list(csv_rows(work / "sweep" / "results.csv"))
    assert len(rows) == trials and all(r["state"] == "complete" for r in rows), rows
    trial_s = sum(float(r["seconds"]) for r in rows)
    return {
        "backend": backend,
        "wall_s": round(wall, 2),
        "trials_s": round(trial_s, 2),
        "overhead_per_trial_s": round((wall - trial_s) / trials, 3),
        "wall_per_trial_s": round(wall / trials, 3),
    }


def csv_rows(path: Path) -> Any:
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_ray.json")
    args = p.parse_args()
    import ray

    from train_helpers import make_tokens_dir, shakespeare_text

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-sweep-ray-") as tmp:
        root = Path(tmp)
        tokens = make_tokens_dir(root / "tokens", shakespeare_text(100_000), vocab_size=320)
        for _ in range(args.rounds):
            for backend in ("optuna", "ray"):
                runs.append(one_sweep(root, tokens, backend, args.trials, len(runs)))
                print(json.dumps(runs[-1]), flush=True)
                write(args, runs, ray.__version__)  # after each sweep: a cut run keeps what it measured


def write(args: argparse.Namespace, runs: list[dict[str, Any]], ray_version: str) -> None:
    summary = {}
    for backend in ("optuna", "ray"):
        mine = [r for r in runs if r["backend"] == backend]
        if mine:
            summary[backend] = {
                k: round(statistics.median(r[k] for r in mine), 3)
                for k in ("wall_s", "overhead_per_trial_s", "wall_per_trial_s")
            }
    ratio = (
        {k: round(summary["ray"][k] / summary["optuna"][k], 2) for k in summary["ray"]}
        if len(summary) == 2
        else {}
    )
    out = {
        "trials_per_sweep": args.trials,
        "rounds": args.rounds,
        "runs": runs,
        "median": summary,
        "ray_over_optuna": ratio,
        "versions": {"ray": ray_version, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
