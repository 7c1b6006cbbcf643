"""Learning-rate schedules as pure functions of the step: warmup, then cosine, linear, constant or WSD.

A schedule is a multiplier of the peak learning rate; because it depends only on the step, resuming needs
no scheduler state beyond the step itself (it is still saved in the checkpoint, for the record).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from lmforge.config import Section


class ScheduleConfig(Section):
    kind: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="decay after warmup: cosine, linear, constant or wsd (warmup-stable-decay)"
    )
    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup from 0 to the peak lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak lr")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of the steps spent decaying at the end"
    )


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) out of `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_steps = max(1, round(total_steps * cfg.decay_fraction))
        start = total_steps - decay_steps
        if step < start:
            return 1.0
        frac = min(1.0, (step - start + 1) / decay_steps)
        return 1.0 - (1.0 - lo) * frac
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - lo) * frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
