"""`micro_batch=auto` for the training commands: the planner's largest micro batch, halved on out-of-memory.

    micro = auto_micro_batch(model_cfg, seq_len=256, global_batch=32, world=1, device=device, ...)
    install_oom_backoff(trainer, sampler)     # a CUDA OOM halves the micro batch and retries the step

The global batch never changes: the sampler draws the same rows for a step whatever the micro batch, so a
backed-off step trains exactly the sequences it would have. On a CPU there is no out-of-memory error to
catch (the OS swaps or kills the process), so `auto` is the planner's answer for the machine's RAM.
With several processes each one backs off on its own error; the others then wait in their next collective
until `dist.timeout_s`, so on multi-GPU runs prefer the planner's number (`lmforge plan`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from lmforge.model.config import ModelConfig
from lmforge.plan.memory import Setup, memory

OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    torch.cuda.OutOfMemoryError,
)


def device_capacity(device: torch.device) -> float:
    """Bytes the plan may use on `device` (a GPU's total memory; 90% of the machine's RAM on a CPU)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def auto_micro_batch(
    cfg: ModelConfig,
    *,
    seq_len: int,
    global_batch: int,
    world: int,
    device: torch.device,
    precision: str,
    checkpointing: bool,
    fsdp: bool,
    method: Literal["pretrain", "full", "lora", "qlora"] = "pretrain",
    lora_rank: int = 8,
    capacity: float | None = None,
) -> int:
    """The largest divisor of the per-process sequences whose predicted peak fits; 1 if none does."""
    per_rank = global_batch // world
    cap = device_capacity(device) if capacity is None else capacity
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        s = Setup(
            cfg,
            method=method,
            seq_len=seq_len,
            micro_batch=micro,
            accum=per_rank // micro,
            precision="fp32" if precision not in ("bf16", "fp16") else precision,  # type: ignore[arg-type]
            checkpointing=checkpointing,
            world=world,
            shard=3 if fsdp and world > 1 else 0,
            lora_rank=lora_rank,
            device="gpu" if device.type == "cuda" else "cpu",
        )
        if memory(s).device_total <= cap:
            return micro
    return 1


def smaller_micro_batch(micro: int, per_rank: int) -> int | None:
    """Half the micro batch, or the largest divisor of the per-process rows below it; None at 1."""
    for m in range(micro // 2, 0, -1):
        if per_rank % m == 0:
            return m
    return None


def install_oom_backoff(trainer: Any, sampler: Any, report: Callable[[str], None] | None = None) -> None:
    """Make `trainer.train_step` retry a step with a smaller micro batch after an out-of-memory error.

    `sampler` has `micro_batch`, `global_batch` and `world_size` (BatchSampler, SFTBatches-like)."""
    step = trainer.train_step

    def guarded() -> Any:
        while True:
            try:
                return step()
            except OOM_ERRORS:
                per_rank = sampler.global_batch // getattr(sampler, "world_size", 1)
                smaller = smaller_micro_batch(sampler.micro_batch, per_rank)
                if smaller is None:
                    raise
                trainer.optimizer.zero_grad(set_to_none=True)  # drop the partial step's gradients
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                msg = (
                    f"out of memory at micro_batch {sampler.micro_batch}: retrying step "
                    f"{trainer.state.step} with micro_batch {smaller} (global batch unchanged)"
                )
                (report or (lambda m: print(m, file=sys.stderr)))(msg)
                sampler.micro_batch = smaller

    trainer.train_step = guarded
