"""Load a model and its tokenizer from whatever folder a user points at, without ever unpickling.

    model, tok = load_model("runs/demo/pretrain")                 # a pretraining run (uses <run>/model/)
    model, tok = load_model("runs/demo/pretrain/model")           # its model folder
    model, tok = load_model("runs/demo/pretrain/checkpoints/step-000200")   # one checkpoint
    model, tok = load_model("hf/SmolLM2-135M")                    # a Hugging Face folder (config.json)

Accepted layouts, tried in this order:
- HF folder: config.json + *.safetensors (via `model.hf.load_hf`), tokenizer files in the same folder.
- quantized model folder (`lmforge quantize`): quant_config.json + model_config.json + model.safetensors.
- lmforge model folder: model_config.json + model.safetensors.
- run directory: <run>/model/ (above), else its newest checkpoint.
- checkpoint: model.safetensors + state.json in <run>/checkpoints/step-N/; the shape comes from
  <run>/model/model_config.json or, before the run finished, from <run>/config.yaml (model + overrides).
The tokenizer is the first folder among (the model folder, the run dir) holding tokenizer.json +
tokenizer_config.json, else `<data>/tokenizer` of the run's config.yaml (what `lmforge tokenize` copies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import Tokenizer, load_tokenizer

MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.safetensors"
_EXPECTED = (
    "an HF model folder (config.json + safetensors), an lmforge model folder (model_config.json + "
    "model.safetensors), a pretraining run directory, or a checkpoint directory (model.safetensors + state.json)"
)


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()


def _run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def find_tokenizer(folders: list[Path], run: Path | None) -> Tokenizer:
    for d in folders:
        if _has_tokenizer(d):
            return load_tokenizer(d)
    tried = [str(d) for d in folders]
    if run is not None:
        data = _run_config(run).get("data")
        if isinstance(data, str):
            cand = Path(data) / "tokenizer"
            if _has_tokenizer(cand):
                return load_tokenizer(cand)
            tried.append(str(cand))
    raise DataError(f"no tokenizer (tokenizer.json + tokenizer_config.json) found in: {', '.join(tried)}")


def _model_config_from_run(run: Path, ckpt: Path) -> ModelConfig:
    """The shape of a checkpoint's model: the run's model_config.json, else rebuilt from its config.yaml."""
    saved = run / "model" / MODEL_CONFIG
    if saved.is_file():
        return _read_model_config(saved)
    cfg = _run_config(run)
    if not cfg:
        raise DataError(
            f"{ckpt}: a checkpoint needs {saved} or {run / 'config.yaml'} to know the model's shape"
        )
    from lmforge.train.pretrain import PretrainConfig, resolve_model

    pcfg = PretrainConfig.model_validate({k: v for k, v in cfg.items() if k != "command"})
    from lmforge.data.shards import read_index

    vocab = int(read_index(Path(pcfg.data))["vocab_size"])
    with torch.device("meta"):
        model = resolve_model(pcfg, vocab, torch.device("meta"), seed=0)
    mcfg = getattr(model, "cfg", None)
    if not isinstance(mcfg, ModelConfig):
        raise DataError(f"{run / 'config.yaml'}: model {pcfg.model!r} is not an lmforge Transformer")
    return mcfg


def _read_model_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a valid model config ({e})") from None


def _load_weights(model: Transformer, file: Path) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise DataError(f"{file}: not found")
    sd = load_file(str(file))
    # DDP / torch.compile wrappers prefix parameter names; the weights are the same.
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DataError(
            f"{file}: weights do not match the model config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )


def _build(mcfg: ModelConfig, weights: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    model = build_model(mcfg, device=device, dtype=dtype, seed=None)
    _load_weights(model, weights)
    return model


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer]:
    """(model in eval mode, tokenizer) from an HF folder, an lmforge model folder, a run or a checkpoint."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: not a directory; expected {_EXPECTED}")
    if (p / "config.json").is_file():
        from lmforge.model.hf import load_hf

        model, _ = load_hf(p, dtype=dtype, device=device)
        return model.eval(), find_tokenizer([p], None)
    if (p / "quant_config.json").is_file():  # an `lmforge quantize` output folder
        from lmforge.quant.io import load_quantized

        return load_quantized(p, device=device, dtype=dtype), find_tokenizer([p], None)
    if (p / MODEL_CONFIG).is_file():
        model = _build(_read_model_config(p / MODEL_CONFIG), p / WEIGHTS, device, dtype)
        run = p.parent if (p.parent / "config.yaml").is_file() else None
        return model.eval(), find_tokenizer([p, p.parent], run)
    if (p / "model" / MODEL_CONFIG).is_file():
        model = _build(_read_model_config(p / "model" / MODEL_CONFIG), p / "model" / WEIGHTS, device, dtype)
        return model.eval(), find_tokenizer([p / "model", p], p)
    ckpt: Path | None = None
    if (p / WEIGHTS).is_file() and (p / "state.json").is_file():
        ckpt = p
    elif (p / "checkpoints").is_dir():
        from lmforge.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(p / "checkpoints")
    if ckpt is None:
        raise DataError(f"{p}: not a model folder; expected {_EXPECTED}")
    run = ckpt.parent.parent
    model = _build(_model_config_from_run(run, ckpt), ckpt / WEIGHTS, device, dtype)
    return model.eval(), find_tokenizer([ckpt, run / "model", run], run)


__all__ = ["find_tokenizer", "load_model"]
