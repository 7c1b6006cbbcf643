"""benchmarks/gpu.py measures on a lent GPU; its --smoke mode runs every part on tiny CPU shapes so the
script is known to work before GPU time is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_every_part() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6  # 4 pretraining configurations, QLoRA, decode
    assert all(r["tokens_per_s"] > 0 for r in rows[:5])  # decode's is a difference of timings: noisy here
    assert rows[4]["trainable"] > 0 and rows[5]["bytes_per_token"] > 0
