"""Quantize a Transformer's Linear layers in place: int8, int4 (round-to-nearest or GPTQ) or NF4.

    from lmforge.quant import quantize_model, calibration_ids
    quantize_model(model, "int8")
    quantize_model(model, "int4", group_size=128)
    quantize_model(model, "int4-gptq", group_size=128, calib=calibration_ids("runs/demo/tokens", n=128, seq_len=256))
    quantize_model(model, "nf4", group_size=64)        # group_size = NF4 block size
    model.quant_spec                                    # what was done (saved as quant_config.json)

Quantized: every Linear inside the blocks (attention q/k/v/o, MLP gate/up/down). The embeddings, norms and
the output head stay in full precision (`include_head=True` quantizes an untied head; a tied head is the
embedding matrix and is never quantized).

GPTQ runs block by block, as in the paper's reference code: the calibration sequences go through the blocks
already quantized, each Linear's Hessian 2/n X^T X is accumulated from the inputs it then sees, and the block
is quantized before its (now quantized) outputs feed the next block. For each layer the output error of
GPTQ's codes and of round-to-nearest codes is measured on the same inputs and kept in `quant_spec.errors`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.quant import (
    METHODS,
    Int4Linear,
    Int8Linear,
    QNF4Linear,
    QuantSpec,
    int4_params,
    quantize_int4_with,
    set_module,
)
from lmforge.model.transformer import unfuse_projections
from lmforge.progress import Progress
from lmforge.quant.gptq import dequantize_codes, gptq_int4, output_error

BITS = {"int8": 8, "int4": 4, "int4-gptq": 4, "nf4": 4}
GROUP_SIZES = {"int4": (32, 64, 128), "int4-gptq": (32, 64, 128), "nf4": (32, 64, 128, 256)}
DEFAULT_GROUP = {"int8": 0, "int4": 128, "int4-gptq": 128, "nf4": 64}


def resolve_group_size(method: str, group_size: int | None) -> int:
    if method not in METHODS:
        raise ConfigError(
            f"method: unknown quantization method {method!r}; expected one of {', '.join(METHODS)}"
        )
    if method == "int8" or group_size is None:
        return DEFAULT_GROUP[method]
    if group_size not in GROUP_SIZES[method]:
        allowed = ", ".join(map(str, GROUP_SIZES[method]))
        raise ConfigError(
            f"group_size: {group_size} is not supported for {method}; expected one of {allowed}"
        )
    return group_size


def target_layers(model: nn.Module, include_head: bool = False) -> list[str]:
    """Dotted names of the Linear layers to quantize: all of them inside the blocks (+ an untied head)."""
    layers: Any = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("quantize: expected an lmforge Transformer (a model with .layers blocks)")
    names = [
        f"layers.{i}.{n}"
        for i, block in enumerate(layers)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    ]
    if include_head and isinstance(getattr(model, "output", None), nn.Linear):
        names.append("output")
    return names


def rtn_layer(linear: nn.Linear, method: str, group_size: int) -> nn.Module:
    """Round-to-nearest quantization of one Linear."""
    if method == "int8":
        return Int8Linear.from_linear(linear)
    if method in ("int4", "int4-gptq"):
        return Int4Linear.from_linear(linear, group_size)
    if method == "nf4":
        return QNF4Linear.from_linear(linear, group_size)
    raise ConfigError(f"unknown quantization method {method!r}")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    *,
    group_size: int | None = None,
    calib: Tensor | None = None,
    include_head: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    batch_size: int = 8,
    calibration_info: dict[str, Any] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Replace the target Linear layers of `model` by quantized ones (in place) and return the model.

    `calib` (N, L) token ids is required by int4-gptq and ignored otherwise.
    """
    g = resolve_group_size(method, group_size)
    names = target_layers(model, include_head)
    spec = QuantSpec(
        method=method,
        bits=BITS[method],
        group_size=g,
        symmetric=method != "int4" and method != "int4-gptq",
        layers=names,
        include_head="output" in names,
        act_order=act_order and method == "int4-gptq",
        damp=damp,
        calibration=calibration_info if method == "int4-gptq" else None,
    )
    model.eval()
    if getattr(model, "quant_spec", None) is not None:
        raise ConfigError("quantize: this model is already quantized; start from a full-precision model")
    unfuse_projections(model)  # an Engine's merged fp weights: stale once layers change
    if method == "int4-gptq":
        if calib is None:
            raise ConfigError("int4-gptq needs calibration data (a tokens directory: data=...)")
        spec.errors = _gptq_model(model, calib, names, g, act_order, damp, batch_size, progress)
    else:
        with Progress(f"quantize {method}", len(names), "layers", enabled=progress) as bar:
            for name in names:
                linear: Any = model.get_submodule(name)
                set_module(model, name, rtn_layer(linear, method, g))
                bar.advance(note=name)
    setattr(model, "quant_spec", spec)  # noqa: B010 - a plain attribute, not a submodule
    return model


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are captured."""


def _first_block_inputs(model: nn.Module, calib: Tensor, batch_size: int) -> list[tuple[Any, ...]]:
    """The positional arguments block 0 receives for each calibration batch: (x, cos, sin, mask, cache, i)."""
    blocks: Any = model.layers
    captured: list[tuple[Any, ...]] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs:
            raise RuntimeError("quantize: the blocks are expected to take positional arguments")
        captured.append(args)
        raise _Stop

    device = next(model.parameters()).device
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, len(calib), batch_size):
            with contextlib.suppress(_Stop):
                model(calib[b : b + batch_size].to(device))
    finally:
        handle.remove()
    return captured


def _hessians(
    block: nn.Module, names: list[str], run: Any
) -> tuple[dict[str, Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Accumulate X^T X of each named Linear's inputs while `run()` pushes the calibration data through."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        mod = block.get_submodule(name)

        def hook(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor, name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (rows, K)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(mod.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: 2.0 * sums[n] / counts[n] for n in names}, handles


def _gptq_layer(
    linear: nn.Linear, h: Tensor, group_size: int, act_order: bool, damp: float, name: str
) -> tuple[Int4Linear, dict[str, float]]:
    w = linear.weight.detach().float()
    try:
        q, scale, zero = gptq_int4(w, h, group_size=group_size, damp=damp, act_order=act_order)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            f"GPTQ: the damped Hessian of {name} is not positive definite (damp={damp}); raise damp, "
            "e.g. damp=0.1, or calibrate on more data"
        ) from None
    s0, z0 = int4_params(w, group_size)
    rtn = output_error(w, dequantize_codes(quantize_int4_with(w, s0, z0, group_size), s0, z0, group_size), h)
    gptq = output_error(w, dequantize_codes(q, scale, zero, group_size), h)
    return Int4Linear.from_codes(linear, q, scale, zero, group_size), {"rtn": rtn, "gptq": gptq}


def _gptq_model(
    model: nn.Module,
    calib: Tensor,
    names: list[str],
    group_size: int,
    act_order: bool,
    damp: float,
    batch_size: int,
    progress: bool,
) -> dict[str, dict[str, float]]:
    blocks: Any = model.layers
    inputs = _first_block_inputs(model, calib, batch_size)
    xs = [args[0] for args in inputs]
    rest = inputs[0][1:4]  # cos, sin, mask: the same for every batch (equal lengths, no cache)
    errors: dict[str, dict[str, float]] = {}
    with Progress("quantize GPTQ", len(names), "layers", enabled=progress) as bar:
        for i, block in enumerate(blocks):
            prefix = f"layers.{i}."
            local = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]

            def run(block: nn.Module = block, i: int = i, xs: list[Tensor] = xs) -> None:
                for x in xs:
                    block(x, *rest, None, i)

            hs, _ = _hessians(block, local, run)
            for name in local:
                new, err = _gptq_layer(
                    block.get_submodule(name), hs[name], group_size, act_order, damp, prefix + name
                )
                set_module(block, name, new)
                errors[prefix + name] = err
                bar.advance(note=prefix + name)
            xs = [block(x, *rest, None, i) for x in xs]  # what the next block sees: quantized outputs
        if "output" in names:
            head: Any = model.output
            norm: Any = model.norm
            hs, _ = _hessians(model, ["output"], lambda: [head(norm(x)) for x in xs])
            new, err = _gptq_layer(head, hs["output"], group_size, act_order, damp, "output")
            set_module(model, "output", new)
            errors["output"] = err
            bar.advance(note="output")
    return errors


__all__ = [
    "BITS",
    "DEFAULT_GROUP",
    "GROUP_SIZES",
    "quantize_model",
    "resolve_group_size",
    "rtn_layer",
    "target_layers",
]
