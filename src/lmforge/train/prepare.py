"""The one path from a built model to the module the loop trains, in one fixed order (torchtitan's):

    adapters (LoRA / QLoRA) -> activation checkpointing -> torch.compile per block -> DDP or FSDP2

    train_model, trainable = prepare_model(model, device=device, method="lora", lora=cfg.lora, ...)

Compiling each block of `model.layers` (not the whole model) before wrapping puts the compiled blocks
inside FSDP2's per-block units and lets DDP's gradient buckets overlap the backward of the blocks.
`lmforge pretrain`, `lmforge finetune`, `lmforge align dpo` and the planner's probe all prepare so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import ConfigError
from lmforge.model.lora import LoraConfig, apply_lora
from lmforge.train import distributed as D
from lmforge.train.distributed import DistConfig


def setup_method(model: nn.Module, method: str, lora: LoraConfig, seed: int = 0) -> dict[str, Any]:
    """Make the right parameters trainable; {"trainable", "total", "fraction", "method"}."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return {"method": method, "trainable": n, "total": n, "fraction": 1.0}
    summary = apply_lora(model, lora, quantize_base=method == "qlora", seed=seed)
    return {"method": method, **summary}


def _blocks(model: nn.Module, what: str) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{what}: the model has no `layers` list of blocks to wrap")
    return layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block of `model.layers` in backward; parameter names stay unchanged."""
    for block in _blocks(model, "activation_checkpointing"):
        forward = block.forward

        def checkpointed(*args: Any, _f: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        setattr(block, "forward", checkpointed)  # noqa: B010 - an instance attribute shadows the method


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every block of `model.layers` in place (parameter names, hence checkpoints, unchanged)."""
    for block in _blocks(model, "compile"):
        block.compile()


def prepare_model(
    model: nn.Module,
    *,
    device: torch.device,
    method: str | None = None,
    lora: LoraConfig | None = None,
    seed: int = 0,
    activation_checkpointing: bool = False,
    compile: bool = False,
    dist: DistConfig | None = None,
    info: D.DistInfo | None = None,
    param_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """(module to train, trainable-parameter summary) for `model`, changed in place in the fixed order.

    `method`: None leaves the parameters as they are (pretraining); full / lora / qlora as setup_method.
    The returned module is `model` itself, or its DDP wrapper with several processes and strategy ddp
    (FSDP2 shards in place). `param_dtype`: FSDP's parameter dtype under mixed precision."""
    summary = None if method is None else setup_method(model, method, lora or LoraConfig(), seed)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    info = info or D.DistInfo()
    return D.wrap(model, dist or DistConfig(), info, device, param_dtype), summary


class TrainableView(nn.Module):
    """The trainable parameters of a model under their own names, and nothing else.

    Given to the loop as the module checkpoints read and write: for LoRA a checkpoint then holds just the
    adapter tensors (and their optimizer state), and loading one writes straight into the live model's
    parameters (they are the same Parameter objects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            *path, leaf = name.split(".")
            node: nn.Module = self
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                child = node._modules[part]
                assert child is not None
                node = child
            node.register_parameter(leaf, p)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("TrainableView holds parameters for checkpoints; run the model itself")


def checkpoint_module(model: nn.Module, method: str) -> nn.Module:
    """What checkpoints hold: the whole model (full) or only its trainable parameters (LoRA, QLoRA)."""
    return model if method == "full" else TrainableView(model)
