"""Pipeline overhead when nothing changed: `lmforge run configs/demo/pipeline.yaml` on a finished demo.

    .venv/bin/python -m benchmarks.pipeline        # after `make demo` (runs/demo/ up to date)

Times, each the median of REPEATS fresh processes on the finished demo:
- the no-op rerun (`lmforge run`: load and validate the four stage configs, which imports each command's
  module, torch included for pretrain, then fingerprint every input and output manifest);
- the same work in a warm process (load_pipeline + why_run for each stage), i.e. without start-up;
- `lmforge --version`, the floor of any lmforge command (interpreter + CLI start-up);
- the peer: GNU make deciding that the former `make demo` chain (four file rules on the manifests, with
  the same dependencies) is up to date (`make -q`), which compares modification times only.
Results: benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "pipeline.json"
PIPELINE = ROOT / "configs" / "demo" / "pipeline.yaml"
REPEATS = 5

# The former Makefile's demo chain, on the same files (recipes never run under make -q).
MAKEFILE = """
D := runs/demo
all: $(D)/pretrain/manifest.json
$(D)/curated/manifest.json: configs/demo/prepare.yaml
\tfalse
$(D)/tokenizer/manifest.json: configs/demo/tokenizer.yaml $(D)/curated/manifest.json
\tfalse
$(D)/tokens/manifest.json: configs/demo/tokenize.yaml $(D)/tokenizer/manifest.json
\tfalse
$(D)/pretrain/manifest.json: configs/demo/pretrain.yaml $(D)/tokens/manifest.json
\tfalse
"""


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0, done


def median_run(cmd: list[str], check: str | None = None) -> float:
    times = []
    for _ in range(REPEATS):
        seconds, done = timed(cmd)
        assert done.returncode == 0, done.stderr[-2000:]
        assert check is None or check in done.stderr, done.stderr[-2000:]
        times.append(seconds)
    return statistics.median(times)


def warm() -> float:
    import os

    from lmforge.pipeline.spec import load_pipeline
    from lmforge.pipeline.state import load_state, why_run

    load_pipeline(PIPELINE)  # imports done once
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        pipe = load_pipeline(PIPELINE)
        state = load_state(pipe.state)
        before = Path.cwd()
        os.chdir(pipe.workdir)
        try:
            assert all(why_run(s, state.get(s.name), pipe.workdir) is None for s in pipe.stages)
        finally:
            os.chdir(before)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    py = sys.executable
    noop = median_run([py, "-m", "lmforge", "run", str(PIPELINE)], check="0 stages ran, 4 up to date")
    floor = median_run([py, "-m", "lmforge", "--version"])
    with tempfile.NamedTemporaryFile("w", suffix=".mk", delete=False) as f:
        f.write(MAKEFILE)
    make = median_run(["make", "-q", "-f", f.name])
    Path(f.name).unlink()
    result = {
        "noop_rerun_s": noop,
        "warm_check_s": warm(),
        "lmforge_startup_s": floor,
        "make_q_s": make,
        "noop_over_make": noop / make,
        "noop_over_startup": noop / floor,
        "repeats": REPEATS,
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
