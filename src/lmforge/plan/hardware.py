"""Devices the planner knows: named GPUs (memory, dense bf16 peak, memory bandwidth, NVLink) and this CPU.

    get_hardware("h100")            # 80 GB, 989 TFLOP/s bf16 dense, 3.35 TB/s
    detect_cpu()                    # RAM of this machine, fp32 matmul FLOP/s and copy bandwidth, measured

Peaks are the vendors' dense (no sparsity) tensor-core numbers. A CPU has no datasheet we can trust for
the machine we run on, so its "peak" is measured in ~0.2 s: the best of a few fp32 matmuls, and a copy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lmforge.errors import ConfigError

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int  # usable device memory (a CPU: its RAM)
    peak_flops: float  # dense bf16 tensor-core FLOP/s (GPU) or measured fp32 matmul FLOP/s (CPU)
    bandwidth: float  # device memory bandwidth, bytes/s
    link_bandwidth: float  # per-device bus bandwidth of collectives inside a node, bytes/s (NVLink, PCIe)
    host_link: float = 25e9  # host <-> device bytes/s for CPU offload (PCIe 4 x16 ~25 GB/s achieved)
    fp32_ratio: float = 0.5  # fp32 (TF32) peak / bf16 peak on GPUs; 1 on a CPU (its peak is fp32)


# Memory as the driver reports it (MiB), so "fits" means fits on the real card.
GPUS: dict[str, Hardware] = {
    "rtx-3090": Hardware("rtx-3090", "gpu", 24576 * MIB, 71e12, 0.936e12, 25e9),
    "rtx-4090": Hardware("rtx-4090", "gpu", 24564 * MIB, 165e12, 1.008e12, 25e9),
    "l40s": Hardware("l40s", "gpu", 46068 * MIB, 362e12, 0.864e12, 25e9),
    "a100-40gb": Hardware("a100-40gb", "gpu", 40960 * MIB, 312e12, 1.555e12, 300e9),
    "a100-80gb": Hardware("a100-80gb", "gpu", 81920 * MIB, 312e12, 2.039e12, 300e9),
    "h100": Hardware("h100", "gpu", 81559 * MIB, 989e12, 3.35e12, 450e9, 50e9),
    "h200": Hardware("h200", "gpu", 143771 * MIB, 989e12, 4.8e12, 450e9, 50e9),
}
ALIASES = {
    "3090": "rtx-3090",
    "4090": "rtx-4090",
    "a100": "a100-80gb",
    "h100-sxm": "h100",
    "24gb": "rtx-4090",
}


def _measure_matmul_flops(seconds: float = 0.12) -> float:
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up the BLAS
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def _measure_bandwidth() -> float:
    x = torch.empty(16 * MIB // 4)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t0))  # read + write
    return best


def detect_cpu() -> Hardware:
    """This machine: physical RAM, and fp32 matmul FLOP/s and copy bandwidth measured with torch's threads."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        name=f"cpu ({os.cpu_count()} cores, {ram / GIB:.0f} GiB)",
        kind="cpu",
        memory_bytes=ram,
        peak_flops=_measure_matmul_flops(),
        bandwidth=_measure_bandwidth(),
        link_bandwidth=5e9,  # gloo over shared memory / loopback, measured order of magnitude
        host_link=float("inf"),
        fp32_ratio=1.0,
    )


def get_hardware(
    name: str,
    memory_gib: float | None = None,
    peak_tflops: float | None = None,
    bandwidth_tbs: float | None = None,
    link_gbs: float | None = None,
) -> Hardware:
    """A named device (or `cpu`, or `custom` with every number given); explicit numbers replace the named ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        hw = detect_cpu()
    elif key == "custom":
        if memory_gib is None or peak_tflops is None:
            raise ConfigError(
                "hardware=custom: give memory_gib and peak_tflops (and bandwidth_tbs, link_gbs)"
            )
        hw = Hardware("custom", "gpu", 0, 0.0, 2e12, 100e9)
    elif key in GPUS:
        hw = GPUS[key]
    else:
        raise ConfigError(
            f"hardware: unknown device {name!r}; expected one of {', '.join([*GPUS, 'cpu', 'custom'])} "
            "or hardware=custom with memory_gib and peak_tflops"
        )
    if memory_gib is not None:
        hw = replace(hw, memory_bytes=int(memory_gib * GIB))
    if peak_tflops is not None:
        hw = replace(hw, peak_flops=peak_tflops * 1e12)
    if bandwidth_tbs is not None:
        hw = replace(hw, bandwidth=bandwidth_tbs * 1e12)
    if link_gbs is not None:
        hw = replace(hw, link_bandwidth=link_gbs * 1e9)
    return hw
