"""Step time, tokens/s and MFU of a `Setup` on a `Hardware`, from FLOPs, memory traffic and communication.

    compute   = tokens x FLOPs/token (x 4/3 with activation checkpointing) / (peak x achievable MFU)
    memory    = (3 weight reads per micro batch + optimizer read/write) / memory bandwidth
    comms     = ring collectives: DDP all-reduce 2(w-1)/w x 4N bytes; FSDP all-gather (w-1)/w x 2N per forward
                (and again in backward when resharding) + reduce-scatter (w-1)/w x 4N, over the slowest link
    offload   = parameters + gradients over the host link, and the AdamW update on the CPU
    step      = max(compute, memory, comms) + 10% of comms (collectives overlap compute, not completely)
                + offload

The achievable MFU is an assumption, stated in the output: 45% of the dense bf16 peak on GPUs (good large
runs reach 40-55%), scaled down for small micro batches (x t / (t + 512), t = tokens per micro batch); on a
CPU 50% of the fp32 matmul rate measured on the spot. FLOPs come from model/config.py `flops_per_token`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmforge.model.config import flops_per_token, num_params
from lmforge.plan.hardware import Hardware
from lmforge.plan.memory import Setup, lora_params, memory

GPU_MFU = 0.45
CPU_MFU = 0.50
EXPOSED_COMMS = 0.10
CPU_ADAM_PARAMS_PER_S = 1.0e9  # AdamW update rate of a host for offloaded shards (fused, many cores)


@dataclass
class Speed:
    step_s: float
    compute_s: float
    memory_s: float
    comms_s: float
    offload_s: float
    tokens_per_s: float
    mfu: float  # model FLOPs (no recomputation) / (devices x peak)
    assumed_mfu: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def model_flops_per_token(s: Setup) -> float:
    """Training FLOPs per token: 6N + attention for full training; LoRA skips the frozen weights' gradients."""
    full = flops_per_token(s.cfg, s.seq_len)
    if s.method in ("pretrain", "full"):
        return full
    return full * 2 / 3 + 6 * lora_params(s.cfg, s.lora_rank, s.lora_targets)


def hardware_flops_per_token(s: Setup) -> float:
    """What the device really computes: activation checkpointing repeats the forward (one third of 6N)."""
    f = model_flops_per_token(s)
    forward = flops_per_token(s.cfg, s.seq_len) / 3
    return f + (forward if s.checkpointing else 0.0)


def estimate(s: Setup, hw: Hardware, link_bandwidth: float | None = None) -> Speed:
    tokens_dev = s.micro_batch * s.accum * s.seq_len  # per device per optimizer step
    peak = hw.peak_flops * (1.0 if s.mixed else hw.fp32_ratio)
    t = s.micro_batch * s.seq_len
    assumed = (GPU_MFU * t / (t + 512)) if hw.kind == "gpu" else CPU_MFU
    compute = tokens_dev * hardware_flops_per_token(s) / (peak * assumed)

    n = num_params(s.cfg)
    m = memory(s)
    pb = 2 if s.mixed else 4
    weight_reads = 3 * s.accum * n * (0.5625 if s.method == "qlora" else pb)
    states = m.weights + m.gradients + m.optimizer
    mem = (weight_reads + 2 * states) / hw.bandwidth

    comms = 0.0
    bw = link_bandwidth or hw.link_bandwidth
    if s.world > 1:
        ring = (s.world - 1) / s.world
        full = s.method in ("pretrain", "full")
        trained = n if full else lora_params(s.cfg, s.lora_rank, s.lora_targets)
        if s.shard == 0:
            comms = 2 * ring * trained * 4 / bw
        else:
            gathers = (2 if s.shard == 3 else 1) * s.accum
            base_b = 0.5625 if s.method == "qlora" else pb
            comms = (gathers * ring * n * base_b + ring * trained * 4) / bw
    offload = 0.0
    if s.offload:
        offload = n / s.world * (pb + 4) / hw.host_link + n / s.world / CPU_ADAM_PARAMS_PER_S
    step = max(compute, mem, comms) + EXPOSED_COMMS * comms + offload
    tps = tokens_dev * s.world / step
    mfu = tps * model_flops_per_token(s) / (s.world * hw.peak_flops)
    return Speed(step, compute, mem, comms, offload, tps, mfu, assumed)
