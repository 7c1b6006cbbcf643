"""`lmforge lora merge`: fold a LoRA adapter into its base model and write a plain Hugging Face folder.

    lmforge lora merge adapter=runs/demo/sft output=runs/demo/merged
    lmforge lora merge adapter=path/to/peft_adapter base=path/to/hf_model output=out/merged dtype=bfloat16

`adapter` is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, from `lmforge finetune`
or from PEFT itself) or a finetune run directory holding one in `adapter/`. The base defaults to the one the
adapter records. For a QLoRA adapter the base weights are first rounded to NF4, as the adapter saw them in
training, so the merged model computes what the QLoRA model computed. The output is an HF folder
(config.json, model.safetensors, tokenizer) that `transformers`, `lmforge generate` and `serve` load, plus
config.yaml, merge_report.json (with a logits parity check of merged vs base + adapter) and manifest.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lmforge.config import (
    ConfigPath,
    ConfigRef,
    EncryptionConfig,
    Section,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.manifest import write_manifest
from lmforge.io import atomic_write_json, staged_output
from lmforge.model.card import write_card
from lmforge.model.hf import save_hf
from lmforge.model.lora import load_adapter, lora_modules, merge_lora
from lmforge.model.source import adapter_base, find_adapter, is_qlora, load_model, tokenizer_dir

COMMAND = "lora merge"


class LoraMergeConfig(Section):
    adapter: ConfigPath = Field(
        ..., description="PEFT adapter folder, or a finetune run directory with adapter/"
    )
    base: ConfigRef | None = Field(
        None,
        description="base model: HF folder or lmforge model folder / run dir (null = the base the adapter names)",
    )
    output: ConfigPath = Field(..., description="output folder for the merged model (HF format)")
    nf4_base: bool | None = Field(
        None,
        description="round the base to NF4 before merging, as QLoRA training saw it "
        "(null = yes when the adapter was trained with method=qlora)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the written weights (the merge itself runs in fp32)"
    )
    parity_tokens: int = Field(
        32,
        ge=0,
        description="tokens of a fixed random input for the merged-vs-adapter logits check (0 = skip)",
    )
    overwrite: bool = Field(False, description="replace an existing output folder")
    encryption: EncryptionConfig = encryption_field()


CONFIG = LoraMergeConfig
DESCRIPTION = (
    "Merge a LoRA/QLoRA adapter (PEFT format) into its base model: W + scale * B @ A for every adapted "
    "Linear, written as a Hugging Face folder with the tokenizer. Exit codes: 0 ok, 2 bad config or data."
)
EXAMPLE = "lmforge lora merge adapter=runs/demo/sft output=runs/demo/merged"


def merge(cfg: LoraMergeConfig) -> dict[str, Any]:
    """Run the merge; returns the report written to merge_report.json."""
    adapter_dir = find_adapter(Path(cfg.adapter))
    base = adapter_base(adapter_dir, cfg.base)
    nf4 = cfg.nf4_base if cfg.nf4_base is not None else is_qlora(adapter_dir)
    model, _ = load_model(base, dtype=torch.float32)
    lcfg = load_adapter(model, adapter_dir, quantize_base=nf4)
    model.eval()  # new adapter layers start in training mode: their dropout would skew the parity check
    n_modules = len(lora_modules(model))
    ids = torch.randint(0, model.cfg.vocab_size, (1, min(cfg.parity_tokens, model.cfg.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        before = model(ids) if cfg.parity_tokens else None
        merge_lora(model)
        diff = float((model(ids) - before).abs().max()) if before is not None else None
    model = model.to(getattr(torch, cfg.dtype))
    report = {
        "adapter": str(adapter_dir),
        "base": str(base),
        "nf4_base": nf4,
        "rank": lcfg.rank,
        "alpha": lcfg.alpha,
        "rslora": lcfg.rslora,
        "scale": lcfg.scale,
        "merged_modules": n_modules,
        "dtype": cfg.dtype,
        "parity_max_abs_logit_diff_fp32": diff,
    }
    tok_dir = tokenizer_dir([adapter_dir, base, base / "model", base.parent])
    with staged_output(Path(cfg.output), overwrite=cfg.overwrite, resume=False) as stage:
        save_hf(model, stage, tokenizer_dir=tok_dir, overwrite=True)  # stages and swaps into `stage` itself
        save_config(cfg, stage, COMMAND)
        atomic_write_json(stage / "merge_report.json", report)
        write_card(stage, stage=stage, kind="merged", mcfg=model.cfg, library="transformers", tags=["lora"])
        write_manifest(stage, stage="lora-merge")
    return report


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    report = merge(cfg)
    diff = report["parity_max_abs_logit_diff_fp32"]
    check = "" if diff is None else f"; merged vs adapter logits: max |diff| {diff:.2e}"
    print(f"merged {report['merged_modules']} LoRA modules into {cfg.output}{check}")
    return 0
