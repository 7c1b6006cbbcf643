"""`lmforge quantize`: weight-only int8 / int4 (RTN or GPTQ) / NF4 model folder plus a measured quality report.

    lmforge quantize model=runs/demo/pretrain output=runs/demo/int8 method=int8 data=runs/demo/tokens
    lmforge quantize -c configs/quantize/int4-gptq.yaml model=runs/demo/pretrain output=runs/demo/int4

The output folder appears atomically and holds model.safetensors (packed weights, scales, zeros),
quant_config.json, model_config.json, the tokenizer files, quant_report.json, config.yaml and
manifest.json; `lmforge generate/chat/serve/eval` load it like any model folder. With `data` (a tokens
directory), GPTQ calibrates on its train split and the report scores its validation split before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from rich.console import Console
from torch import Tensor, nn

from lmforge.config import (
    ConfigPath,
    ConfigRef,
    EncryptionConfig,
    Section,
    capped,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.manifest import ensure_verified, write_manifest
from lmforge.data.shards import read_index
from lmforge.device import pick_device
from lmforge.errors import ConfigError, DataError
from lmforge.eval.perplexity import shards_perplexity
from lmforge.io import atomic_write_json, staged_output
from lmforge.model.card import write_card
from lmforge.model.hub import local_path, pinned
from lmforge.model.quant import save_quantized
from lmforge.model.source import load_model
from lmforge.progress import Progress
from lmforge.quant.calibrate import calibration_ids
from lmforge.quant.quantize import quantize_model, resolve_group_size
from lmforge.quant.report import decode_speed, format_table, numel_by_name, pct, size_report

COMMAND = "quantize"


class CalibrationConfig(Section):
    samples: int = Field(128, ge=1, description="calibration sequences for GPTQ (more = better Hessians)")
    seq_len: int = Field(256, ge=2, description="tokens per calibration sequence (capped at the model's)")
    seed: int = Field(0, description="seed of the sequence positions")
    split: str = Field("train", description="split of the tokens directory to draw from")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward pass")


class ReportConfig(Section):
    enabled: bool = Field(True, description="measure perplexity and decode speed before and after")
    split: str = Field("val", description="split of `data` scored for perplexity / bits per byte")
    max_tokens: int | None = Field(65_536, ge=1, description="score at most this many validation tokens")
    seq_len: int | None = Field(None, ge=2, description="perplexity window (null = the model's max_seq_len)")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    prompt: str = Field("To be, or not to be", description="decode-speed prompt (batch 1, greedy)")
    decode_tokens: int = Field(64, ge=1, description="new tokens per decode-speed run")
    repeats: int = Field(3, ge=1, description="timed decode runs (the median counts)")


class QuantizeConfig(Section):
    model: ConfigRef = Field(
        ...,
        description="full-precision model: run dir, lmforge model folder, HF folder or hub id ORG/NAME[@REV]",
    )
    output: ConfigPath = Field(..., description="quantized model folder to write")
    method: Literal["int8", "int4", "int4-gptq", "nf4"] = Field(
        "int8", description="int8 per channel | int4 group-wise RTN | int4 GPTQ | nf4 (QLoRA's 4-bit)"
    )
    group_size: int | None = Field(
        None, description="int4: 32|64|128 (default 128); nf4 block: 32|64|128|256 (default 64)"
    )
    data: ConfigPath | None = Field(
        None, description="tokens directory: GPTQ calibration (train) and the report's perplexity (val)"
    )
    include_head: bool = Field(False, description="also quantize an untied output head (tied: never)")
    act_order: bool = Field(False, description="GPTQ: quantize columns by decreasing Hessian diagonal")
    damp: float = Field(0.01, gt=0, description="GPTQ: damping, as a fraction of the mean Hessian diagonal")
    calibration: CalibrationConfig = CalibrationConfig()
    report: ReportConfig = ReportConfig()
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="where to quantize and measure")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    verify_input: bool = Field(True, description="check `data` against its manifest first")
    overwrite: bool = Field(False, description="replace an existing output folder")
    encryption: EncryptionConfig = encryption_field()


CONFIG = QuantizeConfig
DESCRIPTION = (
    "Quantize a model's Linear layers (weight-only int8, int4 round-to-nearest or GPTQ, NF4) into a model "
    "folder that generate/chat/serve/eval load, with a report of size, perplexity and decode speed."
)
EXAMPLE = (
    "lmforge quantize model=runs/demo/pretrain output=runs/demo/int4 method=int4-gptq data=runs/demo/tokens"
)


def check_inputs(cfg: QuantizeConfig) -> int:
    """Every check that needs no model, before anything is loaded or written; returns the group size."""
    group = resolve_group_size(cfg.method, cfg.group_size)
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise ConfigError(f"output: {cfg.output} already exists; pass overwrite=true to replace it")
    if not local_path(cfg.model).is_dir():
        raise ConfigError(f"model: {cfg.model} is not a directory (a run, model folder, HF folder or hub id)")
    if cfg.method == "int4-gptq" and cfg.data is None:
        raise ConfigError("data: int4-gptq needs calibration data: set data=<tokens directory>")
    if cfg.data is not None:
        read_index(Path(cfg.data))  # a DataError naming index.json if this is not a tokens directory
        ensure_verified(Path(cfg.data), skip=not cfg.verify_input)
    return group


def measure(model: Any, tok: Any, cfg: QuantizeConfig, when: str) -> dict[str, Any]:
    """Perplexity (with a tokens directory) and decode speed of the model `when` ("before"/"after")."""
    out: dict[str, Any] = {}
    if cfg.data is not None:
        max_len = model.cfg.max_seq_len
        r = cfg.report
        seq_len = capped("report.seq_len", r.seq_len, max_len, say=when == "before") if r.seq_len else max_len
        with Progress(f"quantize perplexity {when}", None, "tokens") as bar:
            out["perplexity"] = shards_perplexity(
                model,
                cfg.data,
                split=r.split,
                seq_len=seq_len,
                batch_size=r.batch_size,
                max_tokens=r.max_tokens,
                verify=False,  # checked once in check_inputs
                progress=bar,
            )
    out["decode"] = decode_speed(
        model, tok, prompt=cfg.report.prompt, tokens=cfg.report.decode_tokens, repeats=cfg.report.repeats
    )
    return out


def run(cfg: QuantizeConfig) -> dict[str, Any]:

    console = Console(stderr=True)
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})  # a hub id's commit, saved in config.yaml
    group = check_inputs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, tok = load_model(cfg.model, device=device)
    if getattr(model, "quant_spec", None) is not None:
        raise ConfigError(f"model: {cfg.model} is already quantized; start from a full-precision model")
    check_vocab(cfg, model)
    fp_numel = numel_by_name(model)
    before = measure(model, tok, cfg, "before") if cfg.report.enabled else {}
    calib, calib_info = calibration(cfg, model)
    t0 = time.perf_counter()
    quantize_model(
        model,
        cfg.method,
        group_size=group,
        calib=calib,
        include_head=cfg.include_head,
        act_order=cfg.act_order,
        damp=cfg.damp,
        batch_size=cfg.calibration.batch_size,
        calibration_info=calib_info,
        progress=True,
    )
    seconds = time.perf_counter() - t0
    after = measure(model, tok, cfg, "after") if cfg.report.enabled else {}
    report = build_report(cfg, model, group, seconds, device, before, after)
    write_output(cfg, model, tok, fp_numel, report)
    console.print(format_table(report))
    console.print(f"quantize: {cfg.method} model -> {cfg.output}")
    return report


def check_vocab(cfg: QuantizeConfig, model: Any) -> None:
    """The ids in `data` must index the model's embedding."""
    if cfg.data is None:
        return
    vocab = int(read_index(Path(cfg.data))["vocab_size"])
    if vocab > model.cfg.vocab_size:
        raise DataError(
            f"data: {cfg.data} holds ids of a {vocab}-token vocabulary, the model has "
            f"{model.cfg.vocab_size}: tokens made with another tokenizer?"
        )


def calibration(cfg: QuantizeConfig, model: Any) -> tuple[Tensor | None, dict[str, Any] | None]:
    """GPTQ's calibration sequences and what the report says of them; (None, None) for the other methods."""
    if cfg.method != "int4-gptq":
        return None, None
    assert cfg.data is not None
    c = cfg.calibration
    seq_len = capped(
        "calibration.seq_len", c.seq_len, model.cfg.max_seq_len, say="seq_len" in c.model_fields_set
    )
    calib = calibration_ids(cfg.data, n=c.samples, seq_len=seq_len, seed=c.seed, split=c.split, verify=False)
    info = {"data": cfg.data, "split": c.split, "samples": c.samples, "seq_len": seq_len, "seed": c.seed}
    return calib, info


def build_report(
    cfg: QuantizeConfig,
    model: nn.Module,
    group: int,
    seconds: float,
    device: Any,
    before: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    """quant_report.json without its size section (measured on the written file)."""
    spec: Any = getattr(model, "quant_spec")  # noqa: B009
    report: dict[str, Any] = {
        "model": cfg.model,
        "method": cfg.method,
        "group_size": group,
        "layers": len(spec.layers),
        "quantize_seconds": seconds,
        "device": str(device),
    }
    if "perplexity" in before:
        b, a = before["perplexity"], after["perplexity"]
        report["perplexity"] = {
            "split": cfg.report.split,
            "before": b,
            "after": a,
            "change_pct": pct(b["perplexity"], a["perplexity"]),
            "bits_per_byte_change_pct": pct(b["bits_per_byte"], a["bits_per_byte"]),
        }
    if "decode" in before:
        report["decode"] = {
            "before": before["decode"],
            "after": after["decode"],
            "speedup": after["decode"]["tokens_per_s"] / before["decode"]["tokens_per_s"],
        }
    if spec.errors:
        errs = list(spec.errors.values())
        report["gptq"] = {
            "rtn_error_mean": sum(e["rtn"] for e in errs) / len(errs),
            "gptq_error_mean": sum(e["gptq"] for e in errs) / len(errs),
            "layers_improved": sum(e["gptq"] < e["rtn"] for e in errs),
            "layers": len(errs),
        }
    return report


def write_output(
    cfg: QuantizeConfig, model: nn.Module, tok: Any, fp_numel: dict[str, int], report: dict[str, Any]
) -> None:
    """The model folder, its report (now with sizes), config and manifest, appearing atomically."""
    with staged_output(Path(cfg.output), overwrite=cfg.overwrite, resume=False) as stage:
        save_quantized(model, stage, tokenizer=tok)
        report["size"] = size_report(fp_numel, model, stage / "model.safetensors")
        atomic_write_json(stage / "quant_report.json", report)
        save_config(cfg, stage, COMMAND)
        write_card(stage, stage=stage, kind="quantized", mcfg=getattr(model, "cfg", None), tags=[cfg.method])
        write_manifest(stage, stage=COMMAND)


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    run(cfg)
    return 0


__all__ = ["CONFIG", "QuantizeConfig", "check_inputs", "main", "run"]
