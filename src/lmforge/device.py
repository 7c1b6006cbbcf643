"""The one device picker: a config's `device` value -> a `torch.device` that exists on this machine.

    pick_device("auto")                  # this machine's GPU when there is one, else the CPU
    pick_device("cuda:3", key="device")  # ConfigError naming the key and what is available, if absent
    pick_device("auto", local_rank=2)    # a torchrun rank: its own GPU (and makes it current)
    pick_device("mps")                   # Apple Silicon's GPU (Metal), when this torch and macOS have it

A device that is not there is the user's mistake, so it is a one-line ConfigError (exit 2), not a
traceback from deep inside torch. The decisions are pure functions of `Facts` (what this machine and torch
build have), so they are tested for every machine on any machine.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError

KNOWN_TYPES = ("cpu", "cuda", "mps")
MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"  # torch runs operators MPS lacks on the CPU when "1"


@dataclass(frozen=True)
class Facts:
    """What the device choice depends on, read once from torch (`facts()`) or given by a test."""

    cuda_count: int = 0
    mps_built: bool = False  # this torch was compiled with MPS (macOS wheels are)
    mps_available: bool = False  # ... and this machine runs it (Apple Silicon, macOS 12.3+)
    macos_14: bool = False  # bf16 on MPS needs macOS 14
    torch_version: tuple[int, int] = (2, 0)
    system: str = "Linux"


def facts() -> Facts:
    mps = torch.backends.mps
    available = mps.is_available()
    return Facts(
        cuda_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        mps_built=mps.is_built(),
        mps_available=available,
        macos_14=bool(available and mps.is_macos_or_newer(14, 0)),
        torch_version=(int(torch.__version__.split(".")[0]), int(torch.__version__.split(".")[1])),
        system=platform.system(),
    )


def available_devices(f: Facts | None = None) -> list[str]:
    """What this machine has, e.g. ['cpu', 'cuda:0', 'cuda:1'] (for messages)."""
    f = f or facts()
    return ["cpu", *(f"cuda:{i}" for i in range(f.cuda_count)), *(["mps"] if f.mps_available else [])]


def resolve(name: str, f: Facts, key: str = "device") -> str:
    """The device `name` means on a machine with `f`: 'cpu', 'cuda', 'cuda:N' or 'mps' (or a ConfigError).
    'auto' is CUDA when present, else the CPU: MPS lacks operators, so it is chosen by name only."""
    if name == "auto":
        return "cuda" if f.cuda_count else "cpu"
    try:
        device: torch.device | None = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    found = ", ".join(available_devices(f))
    if device is None or device.type not in KNOWN_TYPES:
        raise ConfigError(
            f"{key}: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps (available: {found})"
        )
    if device.type == "mps" and not f.mps_available:
        why = (
            f"this torch {'.'.join(map(str, f.torch_version))} has no MPS support"
            if not f.mps_built
            else f"this torch has MPS but this {f.system} machine cannot run it (needs Apple Silicon, macOS 12.3+)"
        )
        raise ConfigError(f"{key}: 'mps' requested but MPS is not available: {why} (available: {found})")
    if device.type == "cuda" and not (f.cuda_count and (device.index is None or device.index < f.cuda_count)):
        raise ConfigError(
            f"{key}: {name!r} requested but this machine has no such device (available: {found})"
        )
    return name


def pick_device(name: str, *, key: str = "device", local_rank: int | None = None) -> torch.device:
    """'auto' = a CUDA GPU when there is one, else the CPU; any other name must exist here.

    With `local_rank` (a torchrun process), a bare 'cuda' means that rank's GPU, made current so that
    collectives and new tensors land there; without it 'cuda' stays unindexed (the current GPU).
    """
    device = torch.device(resolve(name, facts(), key))
    if device.type == "mps" and os.environ.get(MPS_FALLBACK_ENV) != "1":
        print(
            f"note: device=mps: an operator MPS lacks stops the run; {MPS_FALLBACK_ENV}=1 runs it on the CPU",
            file=sys.stderr,
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def mps_precision(precision: str, f: Facts) -> str:
    """The training precision on MPS: auto = fp32; fp16 autocast needs torch 2.5+, bf16 torch 2.6+ and macOS
    14 (older ones raise inside torch)."""
    if precision in ("auto", "fp32"):
        return "fp32"
    need = (2, 5) if precision == "fp16" else (2, 6)
    if f.torch_version < need or (precision == "bf16" and not f.macos_14):
        raise ConfigError(
            f"precision: {precision} autocast on mps needs torch {need[0]}.{need[1]}+"
            f"{' and macOS 14+' if precision == 'bf16' else ''}; use precision=fp32"
            + (" or fp16" if precision == "bf16" and f.torch_version >= (2, 5) else "")
        )
    return precision


def check_training(device: torch.device, *, world_size: int, compile: bool = False) -> None:
    """What lmforge does not run on MPS: several processes (DDP/FSDP need gloo or NCCL, which have no MPS
    tensors) and torch.compile (its MPS backend is a prototype)."""
    if device.type != "mps":
        return
    if world_size > 1:
        raise ConfigError(
            f"device: mps trains in one process; {world_size} processes (DDP/FSDP) need device=cpu or cuda"
        )
    if compile:
        raise ConfigError("compile: torch.compile is not used on device=mps; set compile=false")


__all__ = [
    "KNOWN_TYPES",
    "MPS_FALLBACK_ENV",
    "Facts",
    "available_devices",
    "check_training",
    "facts",
    "mps_precision",
    "pick_device",
    "resolve",
]
