"""`--probe`: train a few real steps with a plan's settings on random tokens and measure memory and speed.

    python -m lmforge.plan.probe spec.json out.json          # what `lmforge plan --probe` runs, per process

Each probe runs in a fresh process (torchrun with gloo for 2+ CPU processes), so nothing the planner or an
earlier probe allocated is counted. The steps go through the shared training loop (`Trainer.train_step`:
accumulation, clipping, DDP/FSDP sync) with the model prepared by `train.prepare.prepare_model`, as the
training commands prepare theirs.

Measurement: on CUDA, `torch.cuda.max_memory_allocated` over the whole run after the model is built. On
the CPU there is no such counter, and the process RSS mixes in glibc's caching (freed memory is kept and
reused), so `MemoryTracker` counts the bytes of live tensors the same way CUDA's counter does. Speed is
tokens/s over `steps` timed steps after the warm-up (on the CPU, extra steps without the tracker, whose
per-operator bookkeeping costs time). With several processes each rank measures itself and the maximum
peak is reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.lora import LoraConfig
from lmforge.model.transformer import build_model
from lmforge.plan.memory import Setup
from lmforge.plan.tracker import MemoryTracker
from lmforge.train import distributed as D
from lmforge.train.distributed import DistConfig
from lmforge.train.loop import LoopSettings, Trainer
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.prepare import prepare_model
from lmforge.train.schedule import ScheduleConfig


def spec_of(s: Setup, steps: int = 3, warmup: int = 1) -> dict[str, Any]:
    d = {k: getattr(s, k) for k in Setup.__dataclass_fields__ if k != "cfg"}
    d["lora_targets"] = list(s.lora_targets)
    return {"cfg": s.cfg.model_dump(mode="json"), "setup": d, "steps": steps, "warmup": warmup}


class RandomTokens:
    """A BatchSource of uniform random token windows: the memory and speed of a step do not depend on text."""

    def __init__(self, vocab: int, seq_len: int, micro: int, accum: int, rank: int) -> None:
        self.vocab, self.seq_len, self.micro, self.accum, self.rank = vocab, seq_len, micro, accum, rank

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(step * 1000 + self.rank)
        out = []
        for _ in range(self.accum):
            w = torch.randint(0, self.vocab, (self.micro, self.seq_len + 1), generator=g)
            out.append({"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()})
        return out

    def state(self, step: int) -> dict[str, int]:
        return {"step": step}


def _lora_targets(targets: list[str]) -> list[str]:
    prefix = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
    return [f"{prefix[t]}.{t}" for t in targets]


def run_local(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the probe in this process (one rank); returns measured peak bytes and tokens/s."""
    cfg = ModelConfig.model_validate(spec["cfg"])
    s = spec["setup"]
    info = D.from_env()
    device = D.pick_device("cuda" if s["device"] == "gpu" else "cpu", info)
    D.init(info, device, 600)
    try:
        model, train_model, autocast = _prepare(cfg, s, info, device)
        optimizer = build_optimizer(model, OptimConfig(eight_bit=s.get("optimizer") == "adamw8bit"))
        roots = [*model.parameters(), *model.buffers()]
        steps, warmup = int(spec["steps"]), int(spec["warmup"])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(
                model=model,
                train_model=train_model,
                optimizer=optimizer,
                batches=RandomTokens(cfg.vocab_size, s["seq_len"], s["micro_batch"], s["accum"], info.rank),
                objective=causal_lm,
                settings=LoopSettings(
                    total_steps=2 * steps + warmup, lr=1e-4, schedule=ScheduleConfig(), progress=False
                ),
                run_dir=Path(tmp),
                info=info,
                autocast=autocast,
            )
            tracker = MemoryTracker(roots) if device.type == "cpu" else None
            elapsed = _measure(trainer, device, tracker, steps, warmup)
        peak = float(torch.cuda.max_memory_allocated() if tracker is None else tracker.peak)
        tokens = steps * s["micro_batch"] * s["accum"] * s["seq_len"] * info.world_size
        peak_all = D.all_reduce_max(int(peak))
        return {
            "peak_bytes": float(peak_all),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "step_s": elapsed / max(steps, 1),
            "world": info.world_size,
            "device": str(device),
            "method": "torch.cuda.max_memory_allocated"
            if tracker is None
            else "live tensor bytes (MemoryTracker, the CPU analogue of max_memory_allocated)",
        }
    finally:
        D.shutdown()


def _prepare(
    cfg: ModelConfig, s: dict[str, Any], info: D.DistInfo, device: torch.device
) -> tuple[nn.Module, nn.Module, Any]:
    """(model, module to train, autocast factory) for the setup, prepared as the training commands do."""
    mixed = s["precision"] != "fp32"
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float16
    lora = s["method"] in ("lora", "qlora")
    model = build_model(cfg, device=device, dtype=dtype if (lora and mixed) else torch.float32)
    sharded = s["shard"] >= 2 and info.enabled
    dcfg = DistConfig(
        strategy="fsdp" if sharded else "ddp",
        cpu_offload=bool(s["offload"]),
        reshard_after_forward=s["shard"] == 3,
    )
    train_model, _ = prepare_model(
        model,
        device=device,
        method=s["method"] if lora else None,
        lora=LoraConfig(rank=s["lora_rank"], targets=_lora_targets(s["lora_targets"])) if lora else None,
        activation_checkpointing=bool(s["checkpointing"]),
        dist=dcfg,
        info=info,
        param_dtype=dtype if (mixed and sharded and not lora) else None,
    )
    autocast: Any = contextlib.nullcontext
    if mixed and not sharded and not lora:

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=dtype)

    return model, train_model, autocast


def _measure(
    trainer: Trainer, device: torch.device, tracker: MemoryTracker | None, steps: int, warmup: int
) -> float:
    """Seconds of `steps` timed training steps after `warmup` ones; the peak memory counts them all."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elapsed = 0.0

    def timed_step() -> float:
        D.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with tracker if tracker is not None else contextlib.nullcontext():
        for i in range(steps + warmup):
            dt = timed_step()
            elapsed += dt if i >= warmup and tracker is None else 0.0
    if tracker is not None:  # the tracker's per-op bookkeeping would slow the timed steps
        elapsed = sum(timed_step() for _ in range(steps))
    return elapsed


def probe(s: Setup, steps: int = 3, warmup: int = 1, timeout: float = 600) -> dict[str, Any]:
    """Run `s` in a fresh process (`s.world` processes through torchrun when more than one)."""
    spec = spec_of(s, steps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        if s.world > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={s.world}",
                "-m",
                "lmforge.plan.probe",
                str(spec_path),
                str(out_path),
            ]
        else:
            cmd = [sys.executable, "-m", "lmforge.plan.probe", str(spec_path), str(out_path)]
        env = {**os.environ}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not out_path.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise LmforgeError("probe failed:\n" + "\n".join(tail))
        result: dict[str, Any] = json.loads(out_path.read_text())
        return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = run_local(spec)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(argv[1]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # A DDP model still referenced at interpreter exit can hang gloo's teardown; everything is written.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
