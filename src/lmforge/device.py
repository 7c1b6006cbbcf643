"""The one device picker: a config's `device` value -> a `torch.device` that exists on this machine.

    pick_device("auto")                  # this machine's GPU when there is one, else the CPU
    pick_device("cuda:3", key="device")  # ConfigError naming the key and what is available, if absent
    pick_device("auto", local_rank=2)    # a torchrun rank: its own GPU (and makes it current)

A device that is not there is the user's mistake, so it is a one-line ConfigError (exit 2), not a
traceback from deep inside torch.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError

KNOWN_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """What this machine has, e.g. ['cpu', 'cuda:0', 'cuda:1'] (for messages)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def _parse(name: str, key: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in KNOWN_TYPES:
        raise ConfigError(
            f"{key}: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps "
            f"(available: {', '.join(available_devices())})"
        )
    return device


def _check_present(device: torch.device, name: str, key: str) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        present = count > 0 and (device.index is None or device.index < count)
    elif device.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        present = True
    if not present:
        raise ConfigError(
            f"{key}: {name!r} requested but this machine has no such device "
            f"(available: {', '.join(available_devices())})"
        )


def pick_device(name: str, *, key: str = "device", local_rank: int | None = None) -> torch.device:
    """'auto' = a CUDA GPU when there is one, else the CPU; any other name must exist here.

    With `local_rank` (a torchrun process), a bare 'cuda' means that rank's GPU, made current so that
    collectives and new tensors land there; without it 'cuda' stays unindexed (the current GPU).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = _parse(name, key)
    _check_present(device, name, key)
    if device.type == "cuda" and device.index is None and local_rank is not None:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


__all__ = ["KNOWN_TYPES", "available_devices", "pick_device"]
