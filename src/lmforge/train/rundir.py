"""A training run's directory: `<output>.partial` while it runs, its final model/ or adapter/, the rename.

    stage = prepare_run_dir(cfg, info)              # rank 0 creates or reopens <output>.partial
    export_result(stage, ckpt, model, tok, method, lora, base)
    finish_run_dir(stage, Path(cfg.output), "finetune")   # manifest, then rename to <output>

Every training command (pretrain, finetune, align dpo) writes its run so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmforge import crypt
from lmforge.data.manifest import write_manifest
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, partial_dir, publish_dir
from lmforge.model.card import write_card
from lmforge.model.config import MODEL_CONFIG, read_model_config, write_model_config
from lmforge.model.lora import LoraConfig, save_adapter
from lmforge.train import distributed as D
from lmforge.train.common import model_config


def prepare_run_dir(cfg: Any, info: D.DistInfo) -> Path:
    """The directory this run writes to (`<output>.partial` until the end); rank 0 creates it.

    `cfg`: any config with `output`, `resume` and `overwrite` (every TrainConfig)."""
    final = Path(cfg.output)
    stage = partial_dir(final)
    if info.is_main:
        if cfg.resume is not None and final.exists() and not stage.exists():
            os.replace(final, stage)  # train a finished run further: reopen it
        elif final.exists() and not cfg.overwrite and cfg.resume is None:
            raise LmforgeError(f"{final} already exists; pass overwrite=true to replace it or --resume auto")
        if stage.exists() and cfg.resume is None:
            if (
                (stage / "checkpoints").is_dir()
                and any((stage / "checkpoints").iterdir())
                and not cfg.overwrite
            ):
                raise LmforgeError(
                    f"{stage} holds checkpoints of an unfinished run; continue it with --resume auto "
                    "or start over with overwrite=true"
                )
            shutil.rmtree(stage)
        stage.mkdir(parents=True, exist_ok=True)
    return stage


def finish_run_dir(stage: Path, final: Path, command: str) -> None:
    """Write the model card of model/ or adapter/, the manifest, and rename `<output>.partial` to `<output>`
    (every training command ends so)."""
    for folder in (stage / "model", stage / "adapter"):
        if folder.is_dir():
            mcfg = read_model_config(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else None
            write_card(folder, stage=stage, kind=command.removeprefix("align "), mcfg=mcfg)
    write_manifest(stage, stage=command)
    publish_dir(stage, final)


def export_final(run_dir: Path, ckpt: Path, model: nn.Module, tokenizer_dir: Path | None) -> None:
    """`model/`: the final weights (a copy of the last checkpoint's), the model config as JSON and the
    tokenizer files, so the folder alone is enough for `generate`, `eval` and `serve`."""
    out = run_dir / "model"
    out.mkdir(exist_ok=True)
    crypt.copy_file(ckpt / "model.safetensors", out / "model.safetensors")
    mcfg = model_config(model)
    if mcfg is not None and hasattr(mcfg, "model_dump"):
        write_model_config(out, mcfg)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                copy = crypt.copy_file if name == "tokenizer.json" else shutil.copyfile  # see tokenizer.save
                copy(tokenizer_dir / name, out / name)


def export_result(
    run_dir: Path, ckpt: Path, model: nn.Module, tok: Any, method: str, lora: LoraConfig, base: str
) -> Path:
    """model/ (full: weights + model_config.json + tokenizer) or adapter/ (PEFT adapter + tokenizer).

    `base`: what the run started from, recorded for `lmforge lora merge` (resolved when a folder)."""
    if method == "full":
        export_final(run_dir, ckpt, model, None)
        out = run_dir / "model"
    else:
        out = run_dir / "adapter"
        base = str(Path(base).resolve()) if Path(base).is_dir() else base
        save_adapter(model, lora, out, base_model=base)
        # Read by `lmforge lora merge`: which base, and whether it was NF4 (qlora) in training.
        atomic_write_json(out / "lmforge_base.json", {"base": base, "method": method})
    tok.save(out)
    return out
