"""One trial: the training command run as a subprocess, its metrics.jsonl tailed, SIGTERM when pruned.

    outcome = run_trial(argv, env, run_dir, log, metric="val_bpb", report=..., poll_s=0.5, stop=event)

Each evaluation record (`{"kind": "eval", "step": s, "val_bpb": ...}`) goes to `report(step, value,
may_prune)`; when it answers True the trainer gets SIGTERM, saves a checkpoint and exits (130), and the
trial is pruned at the step it reached. The child gets SIGTERM too if the sweep dies (Linux
PR_SET_PDEATHSIG), so a killed sweep never leaves a trainer writing into a run that another sweep resumes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.io import partial_dir
from lmforge.model.integrity import list_checkpoints

# Run in the child before exec: ask the kernel for SIGTERM when the parent (the sweep) dies, then become
# the training command. argv[1] is the sweep's pid, to catch a parent that died before prctl.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(130)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)
TERM_WAIT_S = 300.0  # a pruned trainer saves a checkpoint before it exits


@dataclass
class Outcome:
    state: Literal["complete", "pruned", "failed", "interrupted"]
    value: float | None
    steps: int
    error: str | None = None


def training_argv(command: str, config: Path, extra: list[str]) -> list[str]:
    """The child's command line: the launcher above, then `-m lmforge <command> -c <config> ...`."""
    return [
        sys.executable,
        "-c",
        _LAUNCHER,
        str(os.getpid()),
        "-m",
        "lmforge",
        *command.split(),
        "-c",
        str(config),
        *extra,
    ]


class MetricsTail:
    """New complete records of a run's metrics.jsonl, in `<run>.partial/` while it runs, `<run>/` after."""

    def __init__(self, run_dir: Path) -> None:
        self.paths = (partial_dir(run_dir) / "metrics.jsonl", run_dir / "metrics.jsonl")
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a half-written last line waits for the next read
            self.offset += end
            out = []
            for line in data[:end].splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
            return out
        return []


def steps_done(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """Optimizer steps the run trained: its newest checkpoint or its newest record, whichever is later."""
    steps = [int(r.get("step", 0)) for r in records]
    for root in (partial_dir(run_dir), run_dir):
        steps += [s for s, _ in list_checkpoints(root / "checkpoints")]
    return max(steps, default=0)


def last_error(log: Path) -> str:
    """The line that says why a trial failed: its last `error:` line, else its last line."""
    try:
        lines = [x.strip() for x in log.read_text("utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_trial(
    argv: list[str],
    *,
    env: dict[str, str],
    run_dir: Path,
    log: Path,
    metric: str,
    report: Callable[[int, float, bool], bool],
    poll_s: float,
    stop: threading.Event,
    on_start: Callable[[int], None] = lambda pid: None,
) -> Outcome:
    """Run one trial to its end, its pruning or the sweep's stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    on_start(proc.pid)
    tail, seen = MetricsTail(run_dir), []
    state: Literal["complete", "pruned", "failed", "interrupted"] | None = None
    error = None
    while state is None:
        running = proc.poll() is None
        for rec in tail.read():
            seen.append(rec)
            if rec.get("kind") != "eval" or state is not None:
                continue
            value = rec.get(metric)
            if not isinstance(value, (int, float)):
                keys = sorted(k for k, v in rec.items() if isinstance(v, (int, float)) and k != "time")
                state, error = "failed", f"eval records have no number {metric!r}; they have {keys}"
            elif report(int(rec["step"]), float(value), running):
                state = "pruned"
        if state is None and stop.is_set():
            state = "interrupted"
        if state is None and not running:
            break
        if state is None:
            time.sleep(poll_s)
    _terminate(proc)
    seen += tail.read()
    steps = steps_done(run_dir, seen)
    evals = [r for r in seen if r.get("kind") == "eval" and isinstance(r.get(metric), (int, float))]
    value = float(evals[-1][metric]) if evals else None
    if state is not None:
        return Outcome(state, value, steps, error)
    if proc.returncode != 0:
        return Outcome("failed", value, steps, f"exit code {proc.returncode}: {last_error(log)}")
    if value is None or not math.isfinite(value):
        return Outcome("failed", value, steps, f"the run finished without a finite {metric!r}")
    return Outcome("complete", value, steps)
