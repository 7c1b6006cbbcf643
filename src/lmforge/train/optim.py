"""AdamW with the usual parameter groups: weight decay on matrices only, never on norms, biases or embeddings.

    opt = build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0.1))

`fused=True` is used where the installed torch supports it for the parameters' device (CUDA, recent CPU
builds), because it is one kernel per step instead of several per tensor; `optim.fused` forces it on or off.

`optim.eight_bit=true` uses bitsandbytes' AdamW8bit instead (same groups, betas, eps and weight decay): both
moments are stored blockwise-quantised in uint8 (~2 bytes per parameter plus one fp32 scale per 256 values,
instead of 8 bytes), which is what `lmforge plan` recommends when the fp32 moments do not fit. Tensors under
4096 elements (norms, biases) keep fp32 moments, as bitsandbytes does by default.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from lmforge.config import Section
from lmforge.errors import ConfigError


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0, description="peak learning rate (reached after warmup)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay, on 2-D weights only")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = no clipping)")
    fused: bool | None = Field(None, description="fused AdamW kernel; null = use it when supported")
    eight_bit: bool = Field(
        False,
        description="8-bit AdamW (bitsandbytes AdamW8bit): moments in ~2 bytes/param instead of 8; "
        "needs `pip install bitsandbytes`",
    )


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm gains, biases and embeddings are not shrunk towards zero: it only hurts them."""
    return param.ndim < 2 or "embed" in name or name.endswith(".bias") or "norm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_supported(model: nn.Module) -> bool:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return True
    # The CPU fused AdamW kernel exists from torch 2.4 on; it is what recent torch uses when asked.
    return device.type == "cpu" and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)


def _adamw8bit(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(
            f"optim.eight_bit=true needs bitsandbytes, which is not installed ({e}); "
            "run `pip install bitsandbytes` or set optim.eight_bit=false"
        ) from None
    opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    return opt


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.eight_bit:
        return _adamw8bit(model, cfg)
    fused = _fused_supported(model) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )
