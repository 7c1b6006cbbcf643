"""One code path for 1 process and N: process-group setup from the launcher's environment, DDP or FSDP2.

    torchrun --nproc_per_node=2 -m lmforge pretrain -c configs/demo/pretrain.yaml dist.strategy=fsdp
    accelerate launch --multi_gpu --num_processes 2 -m lmforge pretrain -c configs/demo/pretrain.yaml

Without a launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, or MPI's) everything is a no-op single
process; MASTER_ADDR/MASTER_PORT, which every launcher sets, find rank 0. The
backend is nccl on CUDA and gloo on CPU; `timeout_s` bounds every collective, so a hung or dead rank ends
the job with an error instead of blocking the others forever. FSDP2 shards every block of `model.layers`
and then the root, the order torchtitan uses (activation checkpointing and compile are applied first).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

import lmforge.device as lmdevice
from lmforge.config import Section
from lmforge.errors import ConfigError


class DistConfig(Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp (replicate) or fsdp (FSDP2 fully_shard per block)"
    )
    timeout_s: int = Field(600, gt=0, description="collective timeout; a hung rank fails the job after this")
    cpu_offload: bool = Field(
        False,
        description="fsdp only: keep parameters and optimizer state in CPU memory (GPU runs; no-op on CPU)",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp only: free gathered weights after forward (less memory, one more all-gather)"
    )


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# The same facts under each launcher's names: torchrun and `accelerate launch` (RANK...), and the MPI
# launchers behind accelerate's multi-CPU mode (Open MPI, MVAPICH, Intel MPI), in accelerate's order.
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {env[name]!r}") from None
    return default


def from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    env = os.environ if env is None else env
    return DistInfo(
        rank=_first(env, RANK_VARS, 0),
        world_size=_first(env, WORLD_VARS, 1),
        local_rank=_first(env, LOCAL_VARS, 0),
    )


def launched(env: Mapping[str, str] | None = None) -> bool:
    """This process is one rank of a launched job (torchrun, accelerate, mpirun): do not launch again."""
    env = os.environ if env is None else env
    return any(env.get(name, "").strip() for name in WORLD_VARS)


def accelerate_precision(env: Mapping[str, str]) -> str | None:
    """The precision an `accelerate config` asks for (ACCELERATE_MIXED_PRECISION), in lmforge's words."""
    value = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(value) if value else None


def _accelerate_cpu_single(env: Mapping[str, str]) -> bool:
    """`accelerate launch --cpu --num_processes N>1` without mpirun: it sets MASTER_ADDR, starts one process."""
    return env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and not launched(env)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """'auto' = this rank's GPU when there is one, else the CPU (a missing device is a ConfigError);
    `accelerate launch --cpu` (ACCELERATE_USE_CPU) makes 'auto' the CPU."""
    if name == "auto" and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        name = "cpu"
    return lmdevice.pick_device(name, local_rank=info.local_rank)


def init(info: DistInfo, device: torch.device, timeout_s: int) -> None:
    """Join the launcher's process group (a no-op for one process)."""
    if not info.enabled and info.is_main and _accelerate_cpu_single(os.environ):
        print(
            "note: `accelerate launch --cpu` started one process (its multi-CPU mode runs through mpirun: "
            "--mpirun_hostfile); training in 1 process with the same global batch. For N CPU processes on "
            "this machine: accelerate launch --multi_gpu --num_processes N ... device=cpu",
            file=sys.stderr,
        )
    if not info.enabled or dist.is_initialized():
        return
    # On GPUs, gradients go through NCCL while the loop's small control tensors (token counts, loss sums,
    # stop flags) stay on the CPU and need gloo: NCCL alone rejects CPU tensors.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int) -> int:
    """Agree across ranks on an integer flag (e.g. 'some rank received SIGTERM')."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wrap(
    model: nn.Module, cfg: DistConfig, info: DistInfo, device: torch.device, param_dtype: torch.dtype | None
) -> nn.Module:
    """Return the module to train: the model itself (1 process or FSDP, which shards in place) or DDP."""
    if not info.enabled:
        return model
    if cfg.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw: dict[str, Any] = {"mp_policy": mp, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.cpu_offload and device.type != "cpu":
        kw["offload_policy"] = CPUOffloadPolicy()
    elif cfg.cpu_offload and info.is_main:
        # On a CPU run the shards already live in host memory (and the policy needs an accelerator to
        # pin memory), so the same recipe runs on a laptop and on a GPU cluster.
        print("note: dist.cpu_offload has no effect when training on the CPU", file=sys.stderr)
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        for block in layers:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model
