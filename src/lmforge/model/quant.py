"""Quantized weights as the model loads them: the weight-only Linear layers and the quantized folder format.

    layer = Int8Linear.from_linear(linear)                      # int8 codes + one fp32 scale per output row
    layer = Int4Linear.from_linear(linear, group_size=128)      # 2 codes per byte + fp16 scale, uint8 zero/group
    layer = QNF4Linear.from_linear(linear, block_size=64)       # NF4 codes + fp32 absmax per 64 weights
    save_quantized(model, "runs/demo/int4", tokenizer=tok)
    model = load_quantized("runs/demo/int4")        # or: model, tok = model.source.load_model("runs/demo/int4")

The algorithms that choose the codes (round-to-nearest over a model, GPTQ, calibration) live in `lmforge.quant`;
this module is what loading and saving a quantized folder needs, so `model.source` can load one.

Formats (all buffers, so `state_dict()` is exactly what goes to safetensors):
- int8: symmetric, w ~ q * scale with q in [-127, 127], scale = max|row| / 127 (fp32, one per output row).
  8 bits per weight + 32 bits per row.
- int4: asymmetric (min/max per group of `group_size` consecutive inputs of a row): w ~ (q - zero) * scale,
  q and zero in [0, 15]; codes packed 2 per byte, low nibble = even column; scale fp16, zero uint8.
  4 bits per weight + 24 bits per group (4.1875 bits at group 128). A last, shorter group covers an
  in_features that the group size does not divide.
- NF4: QLoRA's NormalFloat4, see `lmforge.model.nf4` (4 + 32/block bits per weight).

Forward dequantizes the weight to the input's dtype and runs one matmul (CPU and GPU). On CPU, int8 in fp32
uses `torch._weight_int8pack_mm` (int8 weights read directly, no fp32 copy) where it was measured faster:
decode-sized inputs (<= 16 rows) on weights of >= 4M entries. Every module
exposes `weight` (the dequantized tensor, not a Parameter) for code that reads `module.weight`.

Folder layout:
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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import DataError
from lmforge.io import atomic_write_json
from lmforge.model.config import MODEL_CONFIG, ModelConfig, read_model_config, write_model_config
from lmforge.model.nf4 import NF4Linear
from lmforge.model.tensorfile import load_tensors, save_tensors
from lmforge.model.transformer import Transformer, rope_tables

METHODS = ("int8", "int4", "int4-gptq", "nf4")
FORMAT_VERSION = 1
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"

_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
# Measured on a 2-core AVX2 CPU in fp32 (torch 2.13): the int8 kernel beats dequantize-then-matmul only for
# decode-sized inputs on large weights (4096x4096, 1 row: 44 ms vs 218 ms) and loses badly elsewhere
# (1024x1024: 2.9 vs 1.2 ms at 1 row; 35x slower at 2048 rows).
_INT8_MM_MAX_ROWS = 16
_INT8_MM_MIN_WEIGHTS = 1 << 22


def _copy_bias(linear: nn.Linear) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


# ---------------------------------------------------------------------------------------------------------
# int8


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) -> (q int8 (N, K), scale fp32 (N,)), symmetric per output row."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row keeps scale 1
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    qweight: Tensor  # (N, K) int8
    scales: Tensor  # (N,) fp32

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), False) if bias else None
        self.fast = True  # use torch._weight_int8pack_mm where it applies and was measured faster

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        layer.qweight, layer.scales = quantize_int8(linear.weight)
        layer.bias = _copy_bias(linear)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if (
            self.fast
            and _INT8_MM
            and x.device.type == "cpu"
            and x.dtype == self.scales.dtype
            and rows <= _INT8_MM_MAX_ROWS
            and self.qweight.numel() >= _INT8_MM_MIN_WEIGHTS
        ):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


# ---------------------------------------------------------------------------------------------------------
# int4


def int4_params(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min/max parameters of w (N, K): (scale fp32 (N, G), zero fp32 (N, G)), G = ceil(K / g).

    The range always includes 0 (so exact zeros stay exact); zero is an integer in [0, 15].
    """
    N, K = w.shape
    G = math.ceil(K / group_size)
    w = w.detach().float()
    padded = F.pad(w, (0, G * group_size - K), value=float("nan")).view(N, G, group_size)
    lo = torch.nan_to_num(padded, nan=float("inf")).amin(dim=2).clamp(max=0)
    hi = torch.nan_to_num(padded, nan=float("-inf")).amax(dim=2).clamp(min=0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # fp16 is what is stored: round the scale now, so the codes are chosen against the stored scale.
    scale = scale.to(torch.float16).float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, zero


def quantize_int4_with(w: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Codes q in [0, 15] (uint8, (N, K)) of w for given per-group scale/zero (N, G)."""
    K = w.shape[1]
    gidx = torch.arange(K, device=w.device) // group_size
    return torch.round(w.float() / scale[:, gidx] + zero[:, gidx]).clamp_(0, 15).to(torch.uint8)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes in [0, 15] -> (N, ceil(K/2)) uint8, low nibble = even column."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, K: int) -> Tensor:
    """Inverse of `pack_int4`: (N, ceil(K/2)) uint8 -> (N, K) uint8."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).view(packed.shape[0], -1)  # (N, 2 * ceil(K/2))
    return q[:, :K]


class Int4Linear(nn.Module):
    qweight: Tensor  # (N, ceil(K/2)) uint8, 2 codes per byte
    scales: Tensor  # (N, G) fp16
    zeros: Tensor  # (N, G) uint8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        N, G = out_features, math.ceil(in_features / group_size)
        self.register_buffer(
            "qweight", torch.zeros(N, math.ceil(in_features / 2), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(N, G, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(N, G, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), False) if bias else None

    @classmethod
    def from_codes(
        cls, linear: nn.Linear, q: Tensor, scale: Tensor, zero: Tensor, group_size: int
    ) -> Int4Linear:
        """Wrap codes chosen elsewhere (RTN below, or GPTQ) with their per-group scale/zero."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, group_size, linear.weight.device
        )
        layer.qweight = pack_int4(q.to(torch.uint8))
        layer.scales = scale.to(torch.float16).contiguous()
        layer.zeros = zero.to(torch.uint8).contiguous()
        layer.bias = _copy_bias(linear)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """Round to nearest (RTN)."""
        scale, zero = int4_params(linear.weight, group_size)
        q = quantize_int4_with(linear.weight, scale, zero, group_size)
        return cls.from_codes(linear, q, scale, zero, group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        N, K, g = self.out_features, self.in_features, self.group_size
        G = self.scales.shape[1]
        q = unpack_int4(self.qweight, K).float()
        if G * g != K:  # a last, shorter group: pad to whole groups, then cut
            q = F.pad(q, (0, G * g - K))
        w = (q.view(N, G, g) - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return w.view(N, G * g)[:, :K].to(dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 asymmetric group={self.group_size}"
        )


# ---------------------------------------------------------------------------------------------------------
# NF4


class QNF4Linear(NF4Linear):
    """`model.nf4.NF4Linear` plus the `weight` view the other quantized layers have."""

    @property
    def weight(self) -> Tensor:
        return self.dequantized_weight()


QUANT_LINEARS: tuple[type[nn.Module], ...] = (Int8Linear, Int4Linear, NF4Linear)


def packed_bytes(method: str, out_features: int, in_features: int, group_size: int) -> int:
    """Exact bytes of one quantized weight (codes + scales + zeros; bias not included)."""
    N, K = out_features, in_features
    if method == "int8":
        return N * K + 4 * N
    if method.startswith("int4"):
        G = math.ceil(K / group_size)
        return N * math.ceil(K / 2) + N * G * (2 + 1)
    if method == "nf4":
        return math.ceil(N * K / 2) + 4 * math.ceil(N * K / group_size)
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------------------------------------
# the folder


@dataclass
class QuantSpec:
    """What `quant.quantize_model` did; saved as quant_config.json and read back by `load_quantized`."""

    method: str
    bits: int
    group_size: int  # int4 group / NF4 block (0 for int8: one scale per output row)
    symmetric: bool  # int8 symmetric; int4 asymmetric (zero points); NF4 absmax (symmetric)
    layers: list[str]
    include_head: bool = False
    act_order: bool = False
    damp: float = 0.01
    calibration: dict[str, Any] | None = None
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # GPTQ vs RTN, per layer
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def save_quantized(model: nn.Module, directory: str | Path, *, tokenizer: Any = None) -> Path:
    """Write the quantized `model` (from `quantize_model`) and optionally its tokenizer into `directory`."""
    spec: QuantSpec | None = getattr(model, "quant_spec", None)
    cfg = getattr(model, "cfg", None)
    if spec is None or not isinstance(cfg, ModelConfig):
        raise ValueError("save_quantized expects an lmforge Transformer quantized by quantize_model")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_tensors(sd, out / WEIGHTS, metadata={"format": "pt", "quantization": spec.method})
    write_model_config(out, cfg)
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
    d = Path(directory)
    spec = read_spec(d)
    cfg = read_model_config(d / MODEL_CONFIG)
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
    sd = load_tensors(d / WEIGHTS)
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


__all__ = [
    "FORMAT_VERSION",
    "METHODS",
    "QUANT_CONFIG",
    "QUANT_LINEARS",
    "Int4Linear",
    "Int8Linear",
    "QNF4Linear",
    "QuantSpec",
    "int4_params",
    "is_quantized_dir",
    "load_quantized",
    "pack_int4",
    "packed_bytes",
    "quantize_int4_with",
    "quantize_int8",
    "read_spec",
    "save_quantized",
    "set_module",
    "unpack_int4",
]
