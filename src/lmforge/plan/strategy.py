"""Choose how to train: micro-batch, accumulation, checkpointing, sharding, offload and optimizer.

Every combination the user left open (`auto`) is tried with the largest micro batch that fits, and the
fastest estimated step wins; slower levers (activation checkpointing, ZeRO-3, CPU offload, 8-bit states)
are therefore used only when they are needed to fit or pay for themselves with a larger micro batch.
When nothing fits, `Infeasible` says by how much the smallest configuration misses, per device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from lmforge.plan.hardware import Hardware
from lmforge.plan.memory import Memory, Setup, memory
from lmforge.plan.speed import Speed, estimate


@dataclass
class Choice:
    setup: Setup
    memory: Memory
    speed: Speed
    global_batch: int  # sequences per optimizer step, all devices
    reasons: dict[str, str]


@dataclass
class Infeasible:
    setup: Setup  # the smallest configuration tried
    memory: Memory
    capacity: float
    short_bytes: float
    devices_needed: int | None  # of this kind, with ZeRO-3 + offload + checkpointing; None if > 4096


def capacity(hw: Hardware) -> float:
    """Bytes a plan may use on one device (a CPU: 90% of RAM, the rest is the OS's)."""
    return hw.memory_bytes * (0.9 if hw.kind == "cpu" else 1.0)


def fits(s: Setup, hw: Hardware) -> tuple[bool, Memory]:
    m = memory(s)
    return m.device_total <= capacity(hw), m


def _divisors(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def global_sequences(global_tokens: int, seq_len: int, world: int) -> int:
    """Sequences per step: the token budget rounded up to a multiple of the number of devices."""
    seqs = max(1, -(-global_tokens // seq_len))
    return -(-seqs // world) * world


def search(
    base: Setup,
    hw: Hardware,
    global_tokens: int,
    *,
    checkpointing: str = "auto",
    sharding: str = "auto",
    offload: str = "auto",
    optimizer: str = "auto",
    micro_batch: int | None = None,
    link_bandwidth: float | None = None,
) -> Choice | Infeasible:
    world = base.world
    per_device = global_sequences(global_tokens, base.seq_len, world) // world
    ckpts = {"auto": [False, True], "on": [True], "off": [False]}[checkpointing]
    shards: list[int] = (
        [0] if world == 1 else {"auto": [0, 2, 3], "none": [0], "zero2": [2], "zero3": [3]}[sharding]
    )
    offloads = {"auto": [False, True], "on": [True], "off": [False]}[offload]
    if optimizer == "auto":
        # 8-bit moments are a last resort: lmforge's trainers use torch's AdamW, so try it first.
        kw = dict(checkpointing=checkpointing, sharding=sharding, offload=offload, micro_batch=micro_batch)
        found = search(base, hw, global_tokens, optimizer="adamw", link_bandwidth=link_bandwidth, **kw)  # type: ignore[arg-type]
        if isinstance(found, Choice):
            return found
        return search(base, hw, global_tokens, optimizer="adamw8bit", link_bandwidth=link_bandwidth, **kw)  # type: ignore[arg-type]
    opts = [optimizer]
    micros = [micro_batch] if micro_batch else _divisors(per_device)
    best: tuple[float, Setup, Memory, Speed] | None = None
    # The non-finite rollback copy is dropped only when nothing else fits: it costs no speed.
    for rb, ck, sh, off, opt in itertools.product((True, False), ckpts, shards, offloads, opts):
        if not rb and best is not None:
            break
        if off and (sh != 3 or hw.kind != "gpu"):
            continue  # lmforge offloads through FSDP2, on GPU runs only
        for mb in micros:
            s = replace(
                base,
                checkpointing=ck,
                shard=sh,  # type: ignore[arg-type]
                offload=off,
                optimizer=opt,  # type: ignore[arg-type]
                micro_batch=mb,
                accum=max(1, per_device // mb),
                rollback=rb,
            )
            ok, m = fits(s, hw)
            if not ok:
                continue
            sp = estimate(s, hw, link_bandwidth)
            # Ties go to the simpler setup: each lever costs a small penalty unless it buys speed.
            score = sp.step_s * (1 + 0.01 * (ck + (sh > 0) + (sh == 3) + off + (opt == "adamw8bit")))
            if best is None or score < best[0]:
                best = (score, s, m, sp)
            break  # the largest fitting micro batch of this combination
    if best is None:
        return _infeasible(base, hw, per_device, shards, opts, offloads, ckpts)
    _, s, m, sp = best
    return Choice(s, m, sp, per_device * world, explain(s, m, hw, per_device))


def _smallest(base: Setup, world: int, shard: int, off: bool, opt: str, ck: bool) -> Setup:
    return replace(
        base,
        rollback=False,
        world=world,
        shard=shard,  # type: ignore[arg-type]
        offload=off,
        optimizer=opt,  # type: ignore[arg-type]
        checkpointing=ck,
        micro_batch=1,
    )


def _infeasible(
    base: Setup,
    hw: Hardware,
    per_device: int,
    shards: list[int],
    opts: list[str],
    offs: list[bool],
    cks: list[bool],
) -> Infeasible:
    sh = max(shards)
    off = (True in offs) and sh == 3 and hw.kind == "gpu"
    s = _smallest(base, base.world, sh, off, opts[-1], cks[-1])
    s = replace(s, accum=per_device)
    m = memory(s)
    cap = capacity(hw)
    needed = None
    if hw.kind == "gpu":
        w = max(2, base.world)
        while w <= 4096:
            t = replace(_smallest(base, w, 3, True, opts[-1], True), accum=1)
            if memory(t).device_total <= cap:
                needed = w
                break
            w *= 2
    return Infeasible(s, m, cap, m.device_total - cap, needed)


def explain(s: Setup, m: Memory, hw: Hardware, per_device: int) -> dict[str, str]:
    """One line per decision, saying why."""
    gib = 1024**3
    r: dict[str, str] = {}
    r["micro_batch"] = (
        f"{s.micro_batch} sequences of {s.seq_len} tokens: the largest divisor of the {per_device} sequences "
        f"per device that fits (peak {m.peak / gib:.2f} GiB of {capacity(hw) / gib:.1f})"
    )
    r["gradient_accumulation"] = (
        f"{s.accum} micro batches per step keep the global batch at {per_device * s.world} sequences"
        if s.accum > 1
        else "none: one micro batch per device already makes the global batch"
    )
    saved = (m.activations_no_ckpt - m.activations_ckpt) / gib
    r["activation_checkpointing"] = (
        f"on: saves {saved:.2f} GiB of activations per micro batch for ~33% more compute"
        if s.checkpointing
        else f"off: activations ({m.activations_no_ckpt / gib:.2f} GiB) fit, recomputing would cost ~33% compute"
    )
    if s.world == 1:
        r["sharding"] = "none: a single device"
    else:
        r["sharding"] = {
            0: "none (DDP): replicated weights, gradients and optimizer states fit; least communication",
            2: "FSDP, no resharding (ZeRO-2-like): states sharded, weights gathered once per step",
            3: "FSDP with resharding (ZeRO-3): weights, gradients and optimizer states all sharded "
            f"{s.world} ways; weights are gathered block by block",
        }[s.shard]
    r["cpu_offload"] = (
        f"on: {m.offloaded / gib:.2f} GiB of shards and Adam states per device move to host memory"
        if s.offload
        else "off: not needed to fit (offload costs PCIe transfers and a CPU optimizer step)"
    )
    r["nonfinite_rollback"] = (
        f"on: {m.rollback / gib:.2f} GiB keep a copy of the trained weights and optimizer state, so an update "
        "that leaves a weight non-finite is undone"
        if s.rollback
        else "off: its copy of the trained weights and optimizer state did not fit; a non-finite update then "
        "stops the run (exit 4) with the newest checkpoint intact"
    )
    r["optimizer"] = (
        "AdamW 8-bit: 1-byte moments were needed to fit"
        if s.optimizer == "adamw8bit"
        else "AdamW with fp32 moments (8 bytes/parameter) fits"
    )
    r["precision"] = (
        f"{s.precision}: frozen base and adapters in {s.precision} on tensor cores"
        if s.mixed and s.method in ("lora", "qlora")
        else f"{s.precision}: autocast with fp32 master weights on tensor cores"
        if s.mixed
        else "fp32: CPUs have no fast bf16 path (about 20x slower than fp32 here)"
        if s.device == "cpu"
        else "fp32 as asked (TF32 tensor cores at about half the bf16 rate)"
    )
    return r
