"""Pretraining throughput on this CPU: lmforge against `transformers` and LitGPT, same model, data and batch.

    .venv/bin/python -m benchmarks.pretrain --data runs/demo/tokens        # after `make demo` (tokens stage)

One Llama shape for all three (6 layers, width 384, 6 heads, SwiGLU 1024, vocab 4,096, ~12M parameters),
sequence 256, batch 8, AdamW (lr 3e-4, weight decay 0.1, grad clip 1.0), fp32, 2 threads, and the same
8 x 257-token windows from the token shards (written once to a .npy every contender reads):

  lmforge        lmforge's model in lmforge's training loop (Trainer.train_step: per-token loss over the
                 batch, clip, non-finite check, schedule)
  transformers   `LlamaForCausalLM` (sdpa attention) in the same lmforge loop
  litgpt         LitGPT's `GPT` (same Llama shape) in a plain PyTorch loop (forward, cross-entropy, backward,
                 clip, fused AdamW), run by the Python of its own venv (benchmarks/.venvs/litgpt) with
                 lmforge on PYTHONPATH; LitGPT's CLI prints a wrong Tok/sec, so tokens/s is measured here
                 the same way for everyone

The machine is shared, so lmforge and one peer run in the same process, alternating step by step, and
tokens/s = timed steps x tokens / the seconds spent in that contender's steps: load spikes hit both alike.
Output: a table with ratios, and benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LITGPT_PY = ROOT / "benchmarks" / ".venvs" / "litgpt" / "bin" / "python"
SHAPE = {"vocab": 4096, "dim": 384, "layers": 6, "heads": 6, "hidden": 1024, "seq": 256, "batch": 8}


def _lmforge_model() -> Any:
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import build_model

    s = SHAPE
    cfg = ModelConfig(
        arch="llama", vocab_size=s["vocab"], dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"],
        n_kv_heads=s["heads"], hidden_dim=s["hidden"], max_seq_len=s["seq"], tie_embeddings=True,
    )  # fmt: skip
    return build_model(cfg, seed=0)


def _hf_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    hf = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=s["seq"], tie_word_embeddings=True, bos_token_id=1, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    hf._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf)


def lmforge_loop_stepper(model: Any, data: Any) -> Callable[[int], None]:
    """One optimizer step of lmforge's Trainer (per-token loss, clip, non-finite check, schedule)."""
    from lmforge.train.loop import LoopSettings, Trainer
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.schedule import ScheduleConfig

    class Fixed:
        def micro_batches(self, step: int) -> list[dict[str, Any]]:
            w = data[step % len(data)]
            return [{"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}]

        def state(self, step: int) -> dict[str, int]:
            return {"step": step}

    model.train()
    trainer = Trainer(
        model=model,
        train_model=model,
        optimizer=build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0.1)),
        batches=Fixed(),
        objective=causal_lm,
        settings=LoopSettings(
            total_steps=10**6, lr=3e-4, schedule=ScheduleConfig(warmup_steps=2), progress=False
        ),
        run_dir=Path("/nonexistent"),  # never written: no checkpoint is saved here
    )
    return lambda i: trainer.train_step() and None


def litgpt_stepper(data: Any) -> Callable[[int], None]:
    """LitGPT's GPT (the same Llama shape) in a plain PyTorch loop with the same optimizer settings."""
    import torch
    import torch.nn.functional as F
    from litgpt.config import Config
    from litgpt.model import GPT

    s = SHAPE
    cfg = Config(
        name="bench", block_size=s["seq"], vocab_size=s["vocab"], padded_vocab_size=s["vocab"],
        n_layer=s["layers"], n_head=s["heads"], n_embd=s["dim"], n_query_groups=s["heads"],
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP", intermediate_size=s["hidden"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    model.train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "wte" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "wte" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)

    def step(i: int) -> None:
        w = data[i % len(data)]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(args: argparse.Namespace) -> None:
    """Time several contenders in one process, alternating step by step, so a shared machine's load
    falls on all of them alike; print {name: tokens/s} as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    data = torch.from_numpy(np.load(args.batches))  # (N, B, T + 1)
    steppers: dict[str, Callable[[int], None]] = {}
    for name in args.worker.split(","):
        if name == "lmforge":
            steppers[name] = lmforge_loop_stepper(_lmforge_model(), data)
        elif name == "transformers":
            steppers[name] = lmforge_loop_stepper(_hf_model(), data)
        else:
            steppers[name] = litgpt_stepper(data)
    busy = dict.fromkeys(steppers, 0.0)
    for i in range(args.warmup + args.steps):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            step(i)
            if i >= args.warmup:
                busy[name] += time.perf_counter() - t0
    tokens = args.steps * SHAPE["batch"] * SHAPE["seq"]
    print(json.dumps({k: tokens / v for k, v in busy.items()}))


def _run(cmd: list[str]) -> dict[str, float] | None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"  failed: {' '.join(cmd[:5])} ...\n{r.stderr[-1500:]}", file=sys.stderr)
        return None
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def write_batches(data: Path, out: Path, n: int, seed: int = 0) -> None:
    from lmforge.data.shards import ShardSet
    from lmforge.train.sampler import BatchSampler, TokenWindows

    windows = TokenWindows(ShardSet(data, "train").arrays, SHAPE["seq"])
    sampler = BatchSampler(windows, global_batch=SHAPE["batch"], micro_batch=SHAPE["batch"], seed=seed)
    arr = np.stack([np.stack([windows.window(int(i)) for i in sampler.global_indices(k)]) for k in range(n)])
    np.save(out, arr.astype(np.int64))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "tokens", help="tokens directory")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    batches = args.out.with_suffix(".batches.tmp.npy")
    batches.parent.mkdir(parents=True, exist_ok=True)
    write_batches(args.data, batches, args.warmup + args.steps)
    flags = ["--batches", str(batches), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    flags += ["--threads", str(args.threads)]
    pairs = {
        "transformers": [sys.executable, "-m", "benchmarks.pretrain", "--worker", "lmforge,transformers"]
    }
    if LITGPT_PY.is_file():
        pairs["litgpt"] = [str(LITGPT_PY), "-m", "benchmarks.pretrain", "--worker", "lmforge,litgpt"]
    else:
        print(f"LitGPT venv not found at {LITGPT_PY}; see docs/pretrain.md", file=sys.stderr)
    results: dict[str, dict[str, float]] = {}
    for peer, cmd in pairs.items():
        rates = _run([*cmd, *flags])
        if rates is not None:
            results[peer] = rates
            print(
                f"lmforge {rates['lmforge']:8.0f} tokens/s   {peer} {rates[peer]:8.0f} tokens/s", flush=True
            )
    batches.unlink(missing_ok=True)
    ratios = {f"lmforge_over_{k}": v["lmforge"] / v[k] for k, v in results.items()}
    result = {
        "benchmark": "pretrain training tokens/s, CPU fp32, contenders alternating step by step per process",
        "shape": SHAPE,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "tokens_per_s": results,
        "ratios": ratios,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python -m benchmarks.pretrain " + " ".join(sys.argv[1:]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| peer | lmforge tokens/s | peer tokens/s | lmforge / peer |\n|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v['lmforge']:,.0f} | {v[k]:,.0f} | {v['lmforge'] / v[k]:.2f}x |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
