"""LoRA / QLoRA fine-tuning on this CPU: lmforge against `transformers` + `peft` (+ bitsandbytes for QLoRA).

    .venv/bin/python -m benchmarks.finetune

One model for all: a Llama (6 layers, width 384, 6 heads, SwiGLU 1024, vocab 4,096, tied embeddings,
~12M parameters) built by `transformers` from a seed and saved once; lmforge loads the same folder with
`load_hf`, so every contender starts from identical weights. Same data (seeded random token windows,
sequence 256, batch 4), same adapters (rank 16, alpha 32, no dropout, on all seven Linears of every block),
same optimizer (AdamW lr 2e-4, no weight decay, grad clip 1.0), fp32 compute, 2 threads, and the same
training loop (lmforge's `Trainer.train_step`), so the differences are the model and adapter code:

  lmforge_lora   lmforge's model + `apply_lora`
  lmforge_qlora  the same with `quantize_base=True` (lmforge's own NF4 base, block 64, no double quant)
  peft_lora      `LlamaForCausalLM` (sdpa attention) + `peft.get_peft_model(LoraConfig(...))`
  peft_qlora     the same loaded with `BitsAndBytesConfig(load_in_4bit, nf4, block 64, no double quant,
                 fp32 compute)` (bitsandbytes' CPU backend)

Speed: all four in one process, alternating step by step, so a shared machine's load falls on all alike;
tokens/s = timed steps x tokens / the seconds spent in that contender's steps.
Memory: each contender alone in a fresh process; `baseline` = RSS after imports and data; `setup` = peak
RSS while building the model (ru_maxrss); `train` = peak RSS during the training steps only (the kernel's
VmHWM, reset with /proc/self/clear_refs after setup). Reported as MiB above the baseline.
Also recorded: each contender's first-step loss (the same weights and data must give the same loss).
Output: a table with ratios, and benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab": 4096, "dim": 384, "layers": 6, "heads": 6, "hidden": 1024, "seq": 256, "batch": 4}
LORA = {"rank": 16, "alpha": 32.0}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ["lmforge_lora", "peft_lora", "lmforge_qlora", "peft_qlora"]
MIB = 1024 * 1024


def save_base(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    cfg = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=s["seq"], tie_word_embeddings=True, bos_token_id=1, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def build(name: str, base: Path) -> Any:
    """The model of one contender, with its adapters attached and only the adapters trainable."""
    import torch

    if name.startswith("lmforge"):
        from lmforge.model.hf import load_hf
        from lmforge.model.lora import LoraConfig, apply_lora

        model, _ = load_hf(base)
        apply_lora(model, LoraConfig(**LORA), quantize_base=name == "lmforge_qlora")
        return model
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if name == "peft_qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kw["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, **kw)
    cfg = peft.LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=HF_TARGETS,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def stepper(model: Any, data: Any) -> tuple[Callable[[], dict[str, Any] | None], Any]:
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
        optimizer=build_optimizer(model, OptimConfig(lr=2e-4, weight_decay=0.0)),
        batches=Fixed(),
        objective=causal_lm,
        settings=LoopSettings(
            total_steps=10**6, lr=2e-4, schedule=ScheduleConfig(warmup_steps=0), progress=False
        ),
        run_dir=Path("/nonexistent"),  # never written: no checkpoint is saved here
    )
    return trainer.train_step, trainer


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker_speed(args: argparse.Namespace, data: Any) -> dict[str, Any]:
    steps: dict[str, Callable[[], dict[str, Any] | None]] = {}
    keep = []
    for name in args.contenders.split(","):
        fn, trainer = stepper(build(name, args.base), data)
        steps[name] = fn
        keep.append(trainer)
    busy = dict.fromkeys(steps, 0.0)
    first_loss: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            out = step()
            if i >= args.warmup:
                busy[name] += time.perf_counter() - t0
            if i == 0 and out is not None:
                first_loss[name] = out["loss"]
    tokens = args.steps * SHAPE["batch"] * SHAPE["seq"]
    return {"tokens_per_s": {k: tokens / v for k, v in busy.items()}, "first_loss": first_loss}


def worker_memory(args: argparse.Namespace, data: Any) -> dict[str, Any]:
    name = args.contenders
    gc.collect()
    baseline = _rss_mib("VmRSS")
    model = build(name, args.base)
    gc.collect()
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    after_setup = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step, _ = stepper(model, data)
    for _ in range(args.steps):
        step()
    train_peak = _rss_mib("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "baseline_mib": baseline,
        "model_resident_mib": after_setup - baseline,
        "setup_peak_mib": setup_peak - baseline,
        "train_peak_mib": train_peak - baseline,
        "trainable_params": trainable,
    }


def _run(cmd: list[str]) -> dict[str, Any] | None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"  failed: {' '.join(cmd[:6])} ...\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune.json")
    p.add_argument("--worker", choices=["speed", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--contenders", help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        # Every contender imports the same libraries before the baseline, so memory deltas are the
        # model and the training alone.
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import torch
        from transformers import LlamaForCausalLM  # noqa: F401

        import lmforge.model.hf
        import lmforge.model.lora
        import lmforge.train.loop  # noqa: F401

        torch.set_num_threads(args.threads)
        data = torch.from_numpy(np.load(args.batches))  # (N, B, T + 1)
        run = worker_speed if args.worker == "speed" else worker_memory
        print(json.dumps(run(args, data)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        base, batches = Path(tmp) / "base", Path(tmp) / "batches.npy"
        save_base(base)
        n = max(args.warmup + args.steps, args.memory_steps)
        rng = np.random.default_rng(0)
        np.save(
            batches, rng.integers(0, SHAPE["vocab"], (n, SHAPE["batch"], SHAPE["seq"] + 1), dtype=np.int64)
        )
        common = ["--base", str(base), "--batches", str(batches), "--threads", str(args.threads)]
        me = [sys.executable, "-m", "benchmarks.finetune"]
        speed = _run([*me, "--worker", "speed", "--contenders", ",".join(CONTENDERS), *common,
                      "--warmup", str(args.warmup), "--steps", str(args.steps)])  # fmt: skip
        if speed is None:
            return 1
        memory: dict[str, Any] = {}
        for name in CONTENDERS:
            m = _run(
                [*me, "--worker", "memory", "--contenders", name, *common, "--steps", str(args.memory_steps)]
            )
            if m is not None:
                memory[name] = m
    rate = speed["tokens_per_s"]
    ratios: dict[str, float] = {
        "lora_tokens_per_s_lmforge_over_peft": rate["lmforge_lora"] / rate["peft_lora"],
        "qlora_tokens_per_s_lmforge_over_peft": rate["lmforge_qlora"] / rate["peft_qlora"],
    }
    for kind in ("lora", "qlora"):
        ours, theirs = memory.get(f"lmforge_{kind}"), memory.get(f"peft_{kind}")
        if ours and theirs:
            ratios[f"{kind}_train_peak_mem_lmforge_over_peft"] = (
                ours["train_peak_mib"] / theirs["train_peak_mib"]
            )
    result = {
        "benchmark": "LoRA/QLoRA fine-tuning tokens/s and peak RSS, CPU fp32, lmforge vs transformers+peft(+bnb)",
        "shape": SHAPE,
        "lora": {**LORA, "targets": "all 7 Linears per block", "dropout": 0.0},
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "memory_steps": args.memory_steps,
        "tokens_per_s": rate,
        "first_step_loss": speed["first_loss"],
        "memory_mib": memory,
        "ratios": ratios,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "command": "python -m benchmarks.finetune " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| contender | tokens/s | first loss | train peak MiB | setup peak MiB | model resident MiB |")
    print("|---|---|---|---|---|---|")
    for name in CONTENDERS:
        m = memory.get(name, {})
        print(
            f"| {name} | {rate[name]:,.0f} | {speed['first_loss'].get(name, float('nan')):.4f} "
            f"| {m.get('train_peak_mib', float('nan')):,.0f} | {m.get('setup_peak_mib', float('nan')):,.0f} "
            f"| {m.get('model_resident_mib', float('nan')):,.0f} |"
        )
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
