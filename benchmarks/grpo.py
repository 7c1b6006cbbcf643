"""GRPO rollouts on this CPU: the KV-cache engine batched across the group against one request at a time.

    .venv/bin/python -m benchmarks.grpo [--model runs/demo/pretrain] [--reps 5]

The rollout phase of `lmforge align grpo` as it runs in training: the demo model (4 layers, width 128,
vocab 4,096) with LoRA adapters (rank 8, on every Linear of the blocks, as `method=lora`), 4 prompts x 8
completions (group_size 8, global_batch 32) of 24 new tokens each, temperature 1, per-row seeds; 1 thread.
Contenders, alternated within each round so a shared machine's load falls on both alike:
  batched     the engine with max_batch_size 64 (what align grpo does: all 32 sequences at once)
  sequential  the same engine, max_batch_size 1 (a generate() call per completion)
Each timing is CPU seconds of this process (time.process_time) for the whole rollout; the median over
`--reps` rounds is reported with tokens/s. Then a short `align grpo` run (5 steps, configs/rl/grpo-demo.yaml)
gives its own split: generation vs training tokens/s from metrics.jsonl.
Output: a table, and benchmarks/results/grpo.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "rl" / "data" / "verse-openings.jsonl"


def rollout_times(model_dir: str, reps: int) -> dict[str, list[float]]:
    import torch

    from lmforge.infer.engine import Engine, GenerationRequest
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.lora import LoraConfig
    from lmforge.model.source import load_model
    from lmforge.train.prepare import prepare_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir)
    prepare_model(model, device=torch.device("cpu"), method="lora", lora=LoraConfig(rank=8, alpha=16), seed=0)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text("utf-8").splitlines()[:4]]
    requests = [
        GenerationRequest(tok.encode(p), SamplingParams(max_tokens=24, temperature=1.0, seed=i * 8 + j))
        for i, p in enumerate(prompts)
        for j in range(8)
    ]
    engines = {
        "batched": Engine(model, tok, max_batch_size=64),
        "sequential": Engine(model, tok, max_batch_size=1),
    }
    out: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, int] = {}
    for eng in engines.values():  # warm-up
        eng.generate(requests[:2])
    for _ in range(reps):
        for name, eng in engines.items():
            t0 = time.process_time()
            done = eng.generate(requests)
            out[name].append(time.process_time() - t0)
            tokens[name] = sum(len(c.token_ids) for c in done)
    out["tokens"] = [float(tokens["batched"])]
    return out


def grpo_run(model_dir: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "lmforge", "align", "grpo", "-c", str(ROOT / "configs/rl/grpo-demo.yaml"),
            f"model={model_dir}", f"output={out}", "max_steps=5", "eval_data=null", "tensorboard=false",
            "progress=false", "checkpoint.every=0",
        ]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"][1:]  # the first step includes warm-up
        med = {k: statistics.median(r[k] for r in train) for k in ("gen_tokens_per_s", "train_tokens_per_s")}
        return {"wall_s": wall, "steps": 5, **med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "pretrain"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    times = rollout_times(args.model, args.reps)
    tokens = times.pop("tokens")[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    run = grpo_run(args.model)
    result = {
        "machine": platform.processor() or platform.machine(),
        "rollout": {"completions": 32, "new_tokens": tokens, "cpu_s": times, "median_cpu_s": med},
        "speedup_batched": med["sequential"] / med["batched"],
        "align_grpo": run,
    }
    print("| rollout (32 completions) | CPU s (median) | tokens/s |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {tokens / v:,.0f} |")
    print(f"batched / sequential: {result['speedup_batched']:.2f}x")
    print(f"align grpo, 5 steps: {run['wall_s']:.1f} s wall; generation {run['gen_tokens_per_s']:,.0f} tok/s, "
          f"training {run['train_tokens_per_s']:,.0f} tok/s")  # fmt: skip
    path = ROOT / "benchmarks" / "results" / "grpo.json"
    path.write_text(json.dumps(result, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
