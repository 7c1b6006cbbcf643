"""`lmforge plan`: memory per device, the training strategy that fits, step time, and the cost of a token budget.

    lmforge plan llama-1.1b hardware=rtx-4090 seq_len=2048 global_batch_tokens=524288
    lmforge plan mistral-7b method=qlora hardware=rtx-4090 --json
    lmforge plan -c configs/plan/llama-100b-pretrain.yaml overlay=plan.yaml
    lmforge plan tiny hardware=cpu seq_len=128 global_batch_tokens=4096 --probe    # measure it too

Planning is arithmetic (under a second); `--probe` then trains a few real steps with the recommended
settings on random tokens (a fresh process; torchrun for several CPU processes) and prints the measured
peak memory and tokens/s beside the prediction. `overlay=FILE` writes the recommended settings as a
config for `lmforge pretrain -c FILE data=... output=...` (or `lmforge finetune`).
Exit codes: 0 a plan, 2 bad input, 5 does not fit even fully sharded, offloaded and checkpointed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from rich.console import Console
from rich.table import Table

from lmforge.config import ConfigPath, ConfigRef, Section, parse_command, valid_keys
from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import atomic_write_text
from lmforge.model.config import ModelConfig, num_params
from lmforge.model.source import model_config
from lmforge.plan.hardware import GIB, Hardware, get_hardware
from lmforge.plan.memory import LORA_TARGETS, Setup, zero_memory
from lmforge.plan.probe import probe
from lmforge.plan.strategy import Choice, Infeasible, search
from lmforge.train.configs import FinetuneConfig, PretrainConfig

EXIT_DOES_NOT_FIT = 5


class DoesNotFit(LmforgeError):
    exit_code = EXIT_DOES_NOT_FIT


def _on_off(value: Any) -> Any:
    """YAML reads a bare on/off as a boolean; accept both spellings."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class PlanConfig(Section):
    model: ConfigRef = Field(
        "small", description="preset name, model YAML, HF folder (config.json) or run folder"
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="ModelConfig fields to change, e.g. {n_layers: 88, dim: 10240}"
    )
    method: Literal["pretrain", "full", "lora", "qlora"] = Field(
        "pretrain", description="pretrain, full fine-tune, LoRA (frozen base) or QLoRA (4-bit NF4 base)"
    )
    seq_len: int | None = Field(
        None, ge=8, description="tokens per sequence (None: max_seq_len, at most 4096)"
    )
    global_batch_tokens: int = Field(
        524288,
        ge=1,
        description="tokens per optimizer step, all devices together (rounded to whole sequences)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 mixed on GPUs, fp32 on CPU; bf16/fp16 = mixed precision"
    )
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field(
        "auto", description="AdamW with fp32 moments, 8-bit moments, or auto (8-bit only when needed to fit)"
    )
    activation_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="recompute blocks in backward: auto (when needed to fit), on or off"
    )
    sharding: Literal["auto", "none", "zero2", "zero3"] = Field(
        "auto", description="several devices: none (DDP), zero2 (FSDP no reshard), zero3 (FSDP reshard)"
    )
    cpu_offload: Literal["auto", "on", "off"] = Field("auto", description="FSDP CPU offload (GPU runs)")
    micro_batch: int | None = Field(
        None, ge=1, description="force this micro batch (None: largest that fits)"
    )
    lora_rank: int = Field(16, ge=1, description="LoRA/QLoRA rank r")
    lora_targets: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: list(LORA_TARGETS),  # type: ignore[arg-type]
        description="projections that get adapters",
    )
    hardware: str = Field(
        "cpu",
        description="rtx-3090, rtx-4090, l40s, a100-40gb, a100-80gb, h100, h200, cpu (this machine) or custom",
    )
    memory_gib: float | None = Field(None, gt=0, description="device memory in GiB (custom, or override)")
    peak_tflops: float | None = Field(None, gt=0, description="dense bf16 peak TFLOP/s (custom, or override)")
    bandwidth_tbs: float | None = Field(None, gt=0, description="memory bandwidth TB/s (custom, or override)")
    devices_per_node: int = Field(1, ge=1, description="devices (GPUs, or CPU processes) per node")
    nodes: int = Field(1, ge=1, description="number of nodes")
    interconnect_gbs: float | None = Field(
        None,
        gt=0,
        description="per-device bandwidth of collectives, GB/s (None: NVLink in a node, 50 GB/s across nodes)",
    )
    price_per_hour: float | None = Field(None, ge=0, description="price of one device-hour, for the cost")
    token_budget: float | None = Field(
        None, gt=0, description="tokens to train (None: 20 per parameter to pretrain, 100M to fine-tune)"
    )
    overlay: ConfigPath | None = Field(
        None, description="write the recommended settings as a YAML config here"
    )
    probe: bool = Field(False, description="also run a few real steps and measure (same as --probe)")
    probe_steps: int = Field(3, ge=1, description="measured probe steps (after one warm-up step)")
    format: Literal["table", "json"] = Field("table", description="print tables, or JSON (same as --json)")

    @field_validator("activation_checkpointing", "cpu_offload", mode="before")
    @classmethod
    def _bools(cls, value: Any) -> Any:
        return _on_off(value)


CONFIG = PlanConfig
DESCRIPTION = (
    "Plan a training run: per-device memory (weights, gradients, optimizer states, activations with and "
    "without checkpointing, logits, buffers), the strategy that fits (micro batch, accumulation, "
    "checkpointing, FSDP sharding, CPU offload, 8-bit optimizer) and why, step time, tokens/s, MFU, and "
    "time and cost of a token budget. --probe runs a few real steps and measures. Exit codes: 0 plan, "
    "2 bad input, 5 does not fit."
)
EXAMPLE = "lmforge plan llama-1.1b hardware=rtx-4090 seq_len=2048 --json"


def resolve(cfg: PlanConfig) -> ModelConfig:
    base = model_config(cfg.model)
    if not cfg.model_overrides:
        return base
    try:
        return ModelConfig.model_validate({**base.model_dump(), **cfg.model_overrides})
    except ValueError as e:
        raise ConfigError(f"model_overrides: {str(e).splitlines()[0]}") from None


def hardware_of(cfg: PlanConfig) -> Hardware:
    return get_hardware(cfg.hardware, cfg.memory_gib, cfg.peak_tflops, cfg.bandwidth_tbs)


def link_of(cfg: PlanConfig, hw: Hardware) -> float:
    if cfg.interconnect_gbs is not None:
        return cfg.interconnect_gbs * 1e9
    return hw.link_bandwidth if cfg.nodes == 1 else min(hw.link_bandwidth, 50e9)


def plan(cfg: PlanConfig, hw: Hardware | None = None) -> dict[str, Any]:
    """The whole answer as plain data (what --json prints); raises DoesNotFit when nothing fits."""
    mcfg = resolve(cfg)
    hw = hw or hardware_of(cfg)
    seq = cfg.seq_len or min(mcfg.max_seq_len, 4096)
    if seq > mcfg.max_seq_len:
        mcfg = mcfg.model_copy(update={"max_seq_len": seq})
    precision: Literal["fp32", "bf16", "fp16"] = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if hw.kind == "gpu" else "fp32")
    )
    world = cfg.devices_per_node * cfg.nodes
    base = Setup(
        mcfg,
        method=cfg.method,
        seq_len=seq,
        precision=precision,
        world=world,
        lora_rank=cfg.lora_rank,
        lora_targets=tuple(cfg.lora_targets),
        device=hw.kind,
    )
    link = link_of(cfg, hw)
    found = search(
        base,
        hw,
        cfg.global_batch_tokens,
        checkpointing=cfg.activation_checkpointing,
        sharding=cfg.sharding,
        offload=cfg.cpu_offload,
        optimizer=cfg.optimizer,
        micro_batch=cfg.micro_batch,
        link_bandwidth=link,
    )
    n = num_params(mcfg)
    head = {
        "model": cfg.model + (" + model_overrides" if cfg.model_overrides else ""),
        "params": n,
        "method": cfg.method,
        "seq_len": seq,
        "hardware": {**asdict(hw), "devices_per_node": cfg.devices_per_node, "nodes": cfg.nodes},
        "interconnect_bytes_per_s": link,
        "zero_stages_gb": {
            f"stage_{k}": zero_memory(n, k, world, precision, "adamw")["total"] / 1e9 for k in range(4)
        },
    }
    if isinstance(found, Infeasible):
        raise DoesNotFit(_infeasible_message(found, hw, head))
    return {**head, **_choice_dict(found, cfg, hw, n)}


def _choice_dict(c: Choice, cfg: PlanConfig, hw: Hardware, n: int) -> dict[str, Any]:
    s, sp = c.setup, c.speed
    budget = cfg.token_budget or (20.0 * n if cfg.method == "pretrain" else 1e8)
    hours = budget / sp.tokens_per_s / 3600
    device_hours = hours * s.world
    mem = c.memory.as_dict()
    return {
        "fits": True,
        "strategy": {
            "micro_batch": s.micro_batch,
            "gradient_accumulation": s.accum,
            "global_batch": c.global_batch,
            "global_batch_tokens": c.global_batch * s.seq_len,
            "activation_checkpointing": s.checkpointing,
            "sharding": {0: "none", 2: "zero2", 3: "zero3"}[s.shard] if s.world > 1 else "none",
            "dist_strategy": "fsdp" if s.shard >= 2 and s.world > 1 else "ddp",
            "cpu_offload": s.offload,
            "optimizer": s.optimizer,
            "nonfinite_rollback": s.rollback,
            "precision": s.precision,
            "devices": s.world,
        },
        "why": c.reasons,
        "memory_bytes": mem,
        "memory_gib": {k: v / GIB for k, v in mem.items() if isinstance(v, float)},
        "capacity_gib": hw.memory_bytes / GIB,
        "speed": {
            **sp.as_dict(),
            "assumption": f"achievable MFU {sp.assumed_mfu:.0%} of the {'bf16' if hw.kind == 'gpu' else 'measured fp32'}"
            " peak; collectives overlap compute except 10%",
        },
        "budget": {
            "tokens": budget,
            "hours": hours,
            "days": hours / 24,
            "device_hours": device_hours,
            "cost": device_hours * cfg.price_per_hour if cfg.price_per_hour is not None else None,
        },
        "overlay": overlay(c, cfg),
    }


def _infeasible_message(f: Infeasible, hw: Hardware, head: dict[str, Any]) -> str:
    s = f.setup
    how = ["micro batch 1", "activation checkpointing"]
    if s.world > 1 and s.shard == 3:
        how.append(f"ZeRO-3 over {s.world} devices")
    if s.offload:
        how.append("CPU offload")
    if s.optimizer == "adamw8bit":
        how.append("8-bit AdamW")
    msg = (
        f"does not fit: {head['model']} ({head['params'] / 1e9:.2f}B parameters, {s.method}, seq_len "
        f"{s.seq_len}) needs {f.memory.device_total / GIB:.2f} GiB per device even with {', '.join(how)}; "
        f"{hw.name} has {f.capacity / GIB:.2f} GiB usable: {f.short_bytes / GIB:.2f} GiB short per device"
    )
    if f.devices_needed is not None:
        msg += f". {f.devices_needed} x {hw.name} with ZeRO-3 + offload would fit"
    return msg


# -- the overlay --------------------------------------------------------------------------------------
def overlay(c: Choice, cfg: PlanConfig) -> dict[str, Any]:
    """Recommended settings as a config of the training command (keys it does not have are listed apart)."""
    s = c.setup
    lora = cfg.method in ("lora", "qlora")
    command = "finetune" if cfg.method != "pretrain" else "pretrain"
    out: dict[str, Any] = {"command": command}
    if lora or cfg.method == "full":
        out.update({"base": cfg.model, "method": cfg.method})
        if lora:
            out["lora"] = {"rank": cfg.lora_rank}
    else:
        out["model"] = cfg.model
    if cfg.model_overrides:
        out["model_overrides"] = dict(cfg.model_overrides)
    out.update(
        {
            "seq_len": s.seq_len,
            "global_batch": c.global_batch,
            "micro_batch": s.micro_batch,
            "activation_checkpointing": s.checkpointing,
            "precision": s.precision,
        }
    )
    if s.world > 1 or s.offload:  # one device: no data parallelism to configure
        out["dist"] = {
            "strategy": "fsdp" if s.shard >= 2 and s.world > 1 else "ddp",
            "cpu_offload": s.offload,
            "reshard_after_forward": s.shard != 2,
        }
    if s.device == "cpu" and s.world > 1 and cfg.nodes == 1:
        out["nproc"] = s.world
    if s.optimizer == "adamw8bit":
        out["optim"] = {"eight_bit": True}
    if not s.rollback:
        out["nonfinite_rollback"] = False
    return _split_supported(out, command)


def _split_supported(out: dict[str, Any], command: str) -> dict[str, Any]:
    """Keep the keys the command's schema has; the others go under `unsupported` for the reader."""
    keys = set(valid_keys(FinetuneConfig if command == "finetune" else PretrainConfig))
    kept: dict[str, Any] = {}
    dropped: dict[str, Any] = {}
    for k, v in out.items():
        if (
            k == "command"
            or (k in keys and not isinstance(v, dict))
            or (k == "model_overrides" and k in keys)
        ):
            kept[k] = v
        elif isinstance(v, dict) and k in keys:
            sub = {kk: vv for kk, vv in v.items() if f"{k}.{kk}" in keys}
            if sub:
                kept[k] = sub
            dropped.update({f"{k}.{kk}": vv for kk, vv in v.items() if f"{k}.{kk}" not in keys})
        elif isinstance(v, dict):
            dropped.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            dropped[k] = v
    return {"config": kept, "unsupported": dropped}


def overlay_yaml(ov: dict[str, Any], plan_cmd: str) -> str:
    cfg = ov["config"]
    lines = [
        f"# lmforge {cfg['command']} -c <this file> data=... output=...  (written by: {plan_cmd})",
    ]
    if ov["unsupported"]:
        lines.append(
            f"# recommended but not settable in lmforge {cfg['command']}: "
            + ", ".join(f"{k}={v}" for k, v in ov["unsupported"].items())
        )
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


# -- output ---------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:,.3f}" if x < GIB else f"{x / GIB:,.2f}"


def print_plan(p: dict[str, Any], probe_result: dict[str, Any] | None = None) -> None:

    con = Console()
    hw = p["hardware"]
    st = p["strategy"]
    title = (
        f"{p['model']} ({p['params'] / 1e9:.3g}B params, {p['method']}, seq {p['seq_len']}) on "
        f"{hw['nodes']} x {hw['devices_per_node']} x {hw['name']}"
    )
    m = p["memory_bytes"]
    t = Table(title=f"{title}: memory per device (GiB)")
    t.add_column("what")
    t.add_column("GiB", justify="right")
    rows = [
        ("weights", m["weights"]),
        ("compute copies (bf16 cache / FSDP gathers / NF4 dequant)", m["compute_copies"]),
        ("gradients", m["gradients"]),
        ("optimizer states", m["optimizer"]),
        ("non-finite rollback copy (nonfinite_rollback)", m["rollback"]),
        (
            "activations, checkpointing " + ("on" if st["activation_checkpointing"] else "off"),
            m["activations"],
        ),
        ("  (activations without checkpointing)", m["activations_no_ckpt"]),
        ("  (activations with checkpointing)", m["activations_ckpt"]),
        ("logits + loss (3 x B x T x V fp32)", m["logits"]),
        ("transient (buckets / unsharded grads)", m["transient"]),
        ("offloaded to host", m["offloaded"]),
        ("peak allocated", m["peak"]),
        ("runtime overhead (context, fragmentation)", m["overhead"]),
    ]
    for name, v in rows:
        t.add_row(name, _gib(v))
    t.add_row(
        "[bold]total / capacity[/bold]", f"[bold]{_gib(m['device_total'])} / {p['capacity_gib']:.2f}[/bold]"
    )
    if probe_result is not None:
        t.add_row("[bold]measured peak (probe)[/bold]", f"[bold]{_gib(probe_result['peak_bytes'])}[/bold]")
    con.print(t)
    t = Table(title="recommended strategy")
    t.add_column("setting")
    t.add_column("value")
    t.add_column("why")
    for key, why_key in (
        ("micro_batch", "micro_batch"),
        ("gradient_accumulation", "gradient_accumulation"),
        ("activation_checkpointing", "activation_checkpointing"),
        ("sharding", "sharding"),
        ("cpu_offload", "cpu_offload"),
        ("optimizer", "optimizer"),
        ("precision", "precision"),
    ):
        t.add_row(key, str(st[key]), p["why"][why_key])
    con.print(t)
    sp, b = p["speed"], p["budget"]
    t = Table(title="speed and cost", show_header=False)
    t.add_row(
        "step time",
        f"{sp['step_s']:.3g} s (compute {sp['compute_s']:.3g}, memory {sp['memory_s']:.3g}, "
        f"comms {sp['comms_s']:.3g}, offload {sp['offload_s']:.3g})",
    )
    t.add_row("tokens/s (all devices)", f"{sp['tokens_per_s']:,.0f}")
    if probe_result is not None:
        t.add_row("measured tokens/s (probe)", f"{probe_result['tokens_per_s']:,.0f}")
    t.add_row("MFU", f"{sp['mfu']:.1%}  ({sp['assumption']})")
    t.add_row("token budget", f"{b['tokens']:.3g} tokens")
    t.add_row("time", f"{b['hours']:,.1f} h ({b['days']:,.1f} days), {b['device_hours']:,.0f} device-hours")
    if b["cost"] is not None:
        t.add_row("cost", f"{b['cost']:,.0f} (at the given price per device-hour)")
    con.print(t)


def _flags(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == "--probe":
            out.append("probe=true")
        elif a == "--json":
            out.append("format=json")
        elif i == 0 and "=" not in a and not a.startswith("-"):
            out.append(f"model={a}")  # `lmforge plan llama-1.1b ...`
        else:
            out.append(a)
    return out


def run_probe(p: dict[str, Any], cfg: PlanConfig) -> dict[str, Any]:

    s = setup_of(p, cfg)
    if s.world > 1 and s.device == "gpu":
        raise ConfigError(
            "--probe with several GPUs: run the overlay with torchrun instead (probes one node's CPU)"
        )
    return probe(s, steps=cfg.probe_steps)


def setup_of(p: dict[str, Any], cfg: PlanConfig) -> Setup:
    st = p["strategy"]
    mcfg = resolve(cfg)
    if p["seq_len"] > mcfg.max_seq_len:
        mcfg = mcfg.model_copy(update={"max_seq_len": p["seq_len"]})
    return Setup(
        mcfg,
        method=cfg.method,
        seq_len=p["seq_len"],
        micro_batch=st["micro_batch"],
        accum=st["gradient_accumulation"],
        precision=st["precision"],
        optimizer=st["optimizer"],
        checkpointing=st["activation_checkpointing"],
        world=st["devices"],
        shard={"none": 0, "zero2": 2, "zero3": 3}[st["sharding"]],  # type: ignore[arg-type]
        offload=st["cpu_offload"],
        lora_rank=cfg.lora_rank,
        lora_targets=tuple(cfg.lora_targets),
        device="gpu" if p["hardware"]["kind"] == "gpu" else "cpu",
    )


def main(argv: list[str]) -> int:
    cfg = parse_command(_flags(argv), CONFIG, "plan", DESCRIPTION, EXAMPLE)
    try:
        p = plan(cfg)
    except DoesNotFit as e:
        if cfg.format == "json":
            print(json.dumps({"fits": False, "message": str(e)}))
        raise
    if cfg.overlay:
        atomic_write_text(Path(cfg.overlay), overlay_yaml(p["overlay"], "lmforge plan " + " ".join(argv)))
    measured = run_probe(p, cfg) if cfg.probe else None
    if measured is not None:
        p["probe"] = {
            **measured,
            "predicted_peak_bytes": p["memory_bytes"]["peak"],
            "peak_error": p["memory_bytes"]["peak"] / measured["peak_bytes"] - 1,
        }
    if cfg.format == "json":
        print(json.dumps(p, indent=2, default=str))
    else:
        print_plan(p, measured)
        if cfg.overlay:
            print(f"wrote {cfg.overlay}")
        else:
            print(overlay_yaml(p["overlay"], "lmforge plan " + " ".join(argv)), end="")
    return 0
