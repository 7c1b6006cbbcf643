"""A quantized model folder on disk: safetensors + JSON only, loadable by `infer.load.load_model`.

    save_quantized(model, "runs/demo/int4", tokenizer=tok)
    model = load_quantized("runs/demo/int4")        # or: model, tok = load_model("runs/demo/int4")

Layout:
    model_config.json     the ModelConfig (same file as a full-precision lmforge model folder)
    quant_config.json     method, bits, group size, symmetric, quantized layers, calibration, errors
    model.safetensors     full-precision tensors (embeddings, norms, head, biases) and, per quantized layer,
                          int8: `<layer>.qweight` int8 (N, K), `<layer>.scales` fp32 (N,)
                          int4: `<layer>.qweight` uint8 (N, ceil(K/2)), `.scales` fp16 (N, G), `.zeros` uint8 (N, G)
                          nf4:  `<layer>.packed` uint8 (ceil(NK/2),), `<layer>.absmax` fp32 (ceil(NK/block),)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import DataError
from lmforge.io import atomic_write_json
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, rope_tables
from lmforge.quant.linear import Int4Linear, Int8Linear, QNF4Linear
from lmforge.quant.quantize import METHODS, QuantSpec, set_module

QUANT_CONFIG = "quant_config.json"
MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.safetensors"


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def save_quantized(model: nn.Module, directory: str | Path, *, tokenizer: Any = None) -> Path:
    """Write the quantized `model` (from `quantize_model`) and optionally its tokenizer into `directory`."""
    from safetensors.torch import save_file

    spec: QuantSpec | None = getattr(model, "quant_spec", None)
    cfg = getattr(model, "cfg", None)
    if spec is None or not isinstance(cfg, ModelConfig):
        raise ValueError("save_quantized expects an lmforge Transformer quantized by quantize_model")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt", "quantization": spec.method})
    tmp.replace(out / WEIGHTS)
    atomic_write_json(out / MODEL_CONFIG, cfg.model_dump(mode="json"))
    atomic_write_json(out / QUANT_CONFIG, spec.to_json())
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def read_spec(directory: str | Path) -> QuantSpec:
    path = Path(directory) / QUANT_CONFIG
    try:
        data = json.loads(path.read_text("utf-8"))
        spec = QuantSpec.from_json(data)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a valid quantization config ({e})") from None
    if spec.method not in METHODS:
        raise DataError(f"{path}: method {spec.method!r}, expected one of {', '.join(METHODS)}")
    if spec.format_version != 1:
        raise DataError(f"{path}: format_version {spec.format_version}, this lmforge reads version 1")
    return spec


def _empty_layer(spec: QuantSpec, linear: nn.Linear) -> nn.Module:
    """A quantized module of the right shapes (values come from the file)."""
    bias = linear.bias is not None
    n_in, n_out = linear.in_features, linear.out_features
    if spec.method == "int8":
        return Int8Linear(n_in, n_out, bias)
    if spec.method.startswith("int4"):
        return Int4Linear(n_in, n_out, bias, spec.group_size)
    return QNF4Linear(n_in, n_out, bias, spec.group_size)


def load_quantized(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """The quantized model in eval mode; full-precision tensors in `dtype`, quantized buffers as stored."""
    from safetensors.torch import load_file

    d = Path(directory)
    spec = read_spec(d)
    try:
        cfg = ModelConfig.model_validate(json.loads((d / MODEL_CONFIG).read_text("utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"{d / MODEL_CONFIG}: not a valid model config ({e})") from None
    if not (d / WEIGHTS).is_file():
        raise DataError(f"{d / WEIGHTS}: not found")
    with torch.device("meta"):  # no memory: every tensor is assigned from the file below
        model = Transformer(cfg)
        for name in spec.layers:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise DataError(f"{d / QUANT_CONFIG}: layer {name!r} is not in the model") from None
            if not isinstance(linear, nn.Linear):
                raise DataError(f"{d / QUANT_CONFIG}: layer {name!r} is not a Linear layer")
            set_module(model, name, _empty_layer(spec, linear))
    sd = load_file(str(d / WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise DataError(
            f"{d / WEIGHTS}: weights do not match {QUANT_CONFIG} and {MODEL_CONFIG} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for mod in model.modules():  # full-precision parameters follow `dtype`; codes and scales keep theirs
        for pname, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        if isinstance(mod, QNF4Linear):
            mod.dtype = dtype
    if cfg.arch == "llama":  # the RoPE tables are not saved: rebuild them (fp32)
        model.rope_cos, model.rope_sin = rope_tables(cfg)
    model.to(device)
    setattr(model, "quant_spec", spec)  # noqa: B010
    return model.eval()


__all__ = ["QUANT_CONFIG", "is_quantized_dir", "load_quantized", "read_spec", "save_quantized"]
