"""Model speed: lmforge's Transformer vs the same-config `transformers` LlamaForCausalLM, forward + backward.

    .venv/bin/python -m benchmarks.model [--steps 10] [--threads 1] [--batch 8] [--seq 256] [--compile]

Both models get the same config (a 13.8M Llama: 6 layers, width 384, 6 heads, SwiGLU 1024, vocab 8192, tied),
the same weights (HF's are copied through lmforge.model.hf), the same batches and the same loss
(cross-entropy on fp32 logits computed outside the model), in one process with the same torch thread count.
Steps alternate between the two models (ABAB...) so load from other processes on the shared machine hits
both alike; after warmup steps the median step gives tokens/s. The machine is shared (load average 5-7
while this was written), so the headline number is tokens per second of process CPU time with one thread,
which other processes barely disturb; wall-clock tokens/s is recorded too. `--compile` wraps both models
in torch.compile. The logits are checked equal first. Results: benchmarks/results/model.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig, flops_per_token
from lmforge.model.hf import load_hf, save_hf
from lmforge.model.transformer import build_model

OUT = Path(__file__).resolve().parent / "results" / "model.json"
CFG = ModelConfig(
    vocab_size=8192, dim=384, n_layers=6, n_heads=6, hidden_dim=1024, max_seq_len=256, tie_embeddings=True
)


def _step(
    forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], ids: torch.Tensor
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one forward + backward."""
    c0, t0 = time.process_time(), time.perf_counter()
    logits = forward(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None
    return time.process_time() - c0, time.perf_counter() - t0


def run(steps: int, warmup: int, batch: int, seq: int, threads: int, compile: bool = False) -> dict[str, Any]:
    import transformers

    torch.set_num_threads(threads)
    cfg = CFG.model_copy(update={"max_seq_len": seq + 1})
    ours = build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa")
        ours, _ = load_hf(Path(tmp) / "hf")
    hf.train()
    ours.train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen) for _ in range(4)]
    with torch.no_grad():
        diff = (ours(batches[0][:, :-1]) - hf(batches[0][:, :-1]).logits).abs().max().item()
    assert diff < 1e-4, f"models disagree before timing: max |logits diff| = {diff}"

    ours_fwd: Callable[..., Any] = torch.compile(ours) if compile else ours
    hf_fwd: Callable[..., Any] = torch.compile(hf) if compile else hf
    runners = {
        "lmforge": (lambda x: ours_fwd(x), list(ours.parameters())),
        "transformers": (lambda x: hf_fwd(x, use_cache=False).logits, list(hf.parameters())),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            fwd, params = runners[name]
            dt = _step(fwd, params, batches[i % len(batches)])
            if i >= warmup:
                times[name].append(dt)
    tokens = batch * seq
    result: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "params": sum(p.numel() for p in ours.parameters()),
        "batch": batch,
        "seq_len": seq,
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "compile": compile,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "max_logits_diff": diff,
    }
    for name, ts in times.items():
        cpu, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        result[name] = {
            "tokens_per_cpu_s": tokens / cpu,
            "tokens_per_wall_s": tokens / wall,
            "gflops_per_cpu_s": flops_per_token(cfg, seq) * tokens / cpu / 1e9,
            "cpu_step_s": [t[0] for t in ts],
            "wall_step_s": [t[1] for t in ts],
        }
    ours_r, hf_r = result["lmforge"], result["transformers"]
    result["ratio_cpu"] = ours_r["tokens_per_cpu_s"] / hf_r["tokens_per_cpu_s"]
    result["ratio_wall"] = ours_r["tokens_per_wall_s"] / hf_r["tokens_per_wall_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    r = run(args.steps, args.warmup, args.batch, args.seq, args.threads, args.compile)
    mode = "torch.compile" if args.compile else "eager"
    print(
        f"{r['params'] / 1e6:.1f}M-param Llama, batch {r['batch']} x seq {r['seq_len']}, fp32, "
        f"{r['threads']} thread(s), {mode}, forward + backward"
    )
    for name in ("lmforge", "transformers"):
        m = r[name]
        print(
            f"  {name:<13} {m['tokens_per_cpu_s']:7.0f} tokens/CPU-s   {m['tokens_per_wall_s']:7.0f} tokens/wall-s"
        )
    print(f"  ratio lmforge / transformers: {r['ratio_cpu']:.2f}x (CPU time), {r['ratio_wall']:.2f}x (wall)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
