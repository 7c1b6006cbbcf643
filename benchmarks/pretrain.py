"""Pretraining throughput on this CPU: lmforge against `transformers` and LitGPT, same model, data and batch.

    .venv/bin/python -m benchmarks.pretrain --data runs/demo/tokens        # after `make demo` (tokens stage)

One Llama shape for all three (6 layers, width 384, 6 heads, SwiGLU 1024, vocab 4,096, ~12M parameters),
sequence 256, batch 8, AdamW (lr 3e-4, weight decay 0.1, grad clip 1.0), fp32, the same 8 x 257-token
windows from the demo token shards (written once to a .npy every contender reads), 2 threads, one process
at a time:

  lmforge        lmforge's model in lmforge's training loop (Trainer.train_step: per-token loss over the
                 batch, clip, non-finite check, schedule)
  transformers   `LlamaForCausalLM` (sdpa attention) in the same lmforge loop: the same optimizer code
                 path, so the ratio is the model's speed
  litgpt         LitGPT's `GPT` (same Llama config) in a plain PyTorch loop, run by the Python of its own
                 venv (benchmarks/.venvs/litgpt); its CLI's printed Tok/sec is wrong, so tokens/s is
                 measured here the same way for everyone: timed steps after warm-up steps

Each contender runs `--rounds` times, alternating, and its best round counts (the machine is shared).
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
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LITGPT_PY = ROOT / "benchmarks" / ".venvs" / "litgpt" / "bin" / "python"
SHAPE = {"vocab": 4096, "dim": 384, "layers": 6, "heads": 6, "hidden": 1024, "seq": 256, "batch": 8}


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _timed(step_fn: Any, warmup: int, steps: int) -> float:
    """tokens/s over `steps` timed steps after `warmup` untimed ones."""
    for i in range(warmup):
        step_fn(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    return steps * SHAPE["batch"] * SHAPE["seq"] / (time.perf_counter() - t0)


def run_lmforge_loop(model_kind: str, batches_path: str, warmup: int, steps: int) -> float:
    """lmforge's Trainer.train_step driving either lmforge's model or transformers' Llama."""
    import torch

    from lmforge.train.loop import LoopSettings, Trainer
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.schedule import ScheduleConfig

    data = torch.from_numpy(np.load(batches_path))  # (N, B, T + 1)
    s = SHAPE
    if model_kind == "lmforge":
        from lmforge.model.config import ModelConfig
        from lmforge.model.transformer import build_model

        cfg = ModelConfig(
            arch="llama", vocab_size=s["vocab"], dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"],
            n_kv_heads=s["heads"], hidden_dim=s["hidden"], max_seq_len=s["seq"], tie_embeddings=True,
        )  # fmt: skip
        model: torch.nn.Module = build_model(cfg, seed=0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
            max_position_embeddings=s["seq"], tie_word_embeddings=True, bos_token_id=1, eos_token_id=0,
            pad_token_id=0,
        )  # fmt: skip
        hf._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf)
    model.train()

    class Fixed:
        def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
            w = data[step % len(data)]
            return [{"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}]

        def state(self, step: int) -> dict[str, int]:
            return {"step": step}

    trainer = Trainer(
        model=model,
        train_model=model,
        optimizer=build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0.1)),
        batches=Fixed(),
        objective=causal_lm,
        settings=LoopSettings(
            total_steps=warmup + steps, lr=3e-4, schedule=ScheduleConfig(warmup_steps=2), progress=False
        ),
        run_dir=Path("/nonexistent"),  # never written: no checkpoint is saved here
    )
    return _timed(lambda i: trainer.train_step(), warmup, steps)


LITGPT_WORKER = r"""
import json, sys, time
import numpy as np, torch
import torch.nn.functional as F
from litgpt.config import Config
from litgpt.model import GPT
s = json.loads(sys.argv[1]); path, warmup, steps, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
cfg = Config(name="bench", block_size=s["seq"], vocab_size=s["vocab"], padded_vocab_size=s["vocab"],
             n_layer=s["layers"], n_head=s["heads"], n_embd=s["dim"], n_query_groups=s["heads"],
             rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
             mlp_class_name="LLaMAMLP", intermediate_size=s["hidden"])
torch.manual_seed(0)
model = GPT(cfg); model.train()
decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n]
other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                        lr=3e-4, betas=(0.9, 0.95), fused=True)
data = torch.from_numpy(np.load(path))
def step(i):
    w = data[i % len(data)]
    logits = model(w[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
for i in range(warmup): step(i)
t0 = time.perf_counter()
for i in range(warmup, warmup + steps): step(i)
print(json.dumps({"tokens_per_s": steps * s["batch"] * s["seq"] / (time.perf_counter() - t0),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def worker(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    rate = run_lmforge_loop(args.worker, args.batches, args.warmup, args.steps)
    print(json.dumps({"tokens_per_s": rate}))


def _run(cmd: list[str]) -> float | None:
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )
    if r.returncode != 0:
        print(f"  failed: {' '.join(cmd[:4])} ...\n{r.stderr[-1500:]}", file=sys.stderr)
        return None
    return float(json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_s"])


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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain.json")
    p.add_argument("--worker", choices=["lmforge", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    batches = args.out.with_suffix(".batches.tmp.npy")
    batches.parent.mkdir(parents=True, exist_ok=True)
    write_batches(args.data, batches, args.warmup + args.steps)
    common = [str(batches), str(args.warmup), str(args.steps)]
    cmds = {
        name: [sys.executable, "-m", "benchmarks.pretrain", "--worker", name, "--batches", common[0],
               "--warmup", common[1], "--steps", common[2], "--threads", str(args.threads)]
        for name in ("lmforge", "transformers")
    }  # fmt: skip
    if LITGPT_PY.is_file():
        cmds["litgpt"] = [str(LITGPT_PY), "-c", LITGPT_WORKER, json.dumps(SHAPE), *common, str(args.threads)]
    else:
        print(f"LitGPT venv not found at {LITGPT_PY}; see docs/pretrain.md", file=sys.stderr)
    rounds: dict[str, list[float]] = {k: [] for k in cmds}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            rate = _run(cmd)
            if rate is not None:
                rounds[name].append(rate)
                print(f"round {r + 1} {name:<13} {rate:8.0f} tokens/s", flush=True)
    batches.unlink(missing_ok=True)
    best = {k: max(v) for k, v in rounds.items() if v}
    base = best.get("lmforge")
    ratios = {f"lmforge_over_{k}": base / v for k, v in best.items() if k != "lmforge" and base}
    result = {
        "benchmark": "pretrain tokens/s, CPU fp32",
        "shape": SHAPE,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": rounds,
        "best_tokens_per_s": best,
        "ratios": ratios,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python -m benchmarks.pretrain " + " ".join(sys.argv[1:]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| contender | tokens/s (best) | lmforge / contender |\n|---|---|---|")
    for k, v in best.items():
        ratio = "1.00" if k == "lmforge" else f"{ratios[f'lmforge_over_{k}']:.2f}x"
        print(f"| {k} | {v:,.0f} | {ratio} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
