"""Early stopping and the best checkpoint: watch one evaluation metric, remember its best value and step,
and stop after `patience` evaluations in a row without an improvement of more than `min_delta`.

The tracker's state (best value, best step, evaluations without improvement) goes into every checkpoint,
so a resumed run stops at the same step as an uninterrupted one. The loop saves a checkpoint at each new
best, and pruning never removes it; with `restore_best` the run's model/ (or adapter/) holds its weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError


class EarlyStoppingConfig(Section):
    patience: int = Field(
        0,
        ge=0,
        description="stop after this many evaluations in a row without an improvement (0 = never stop early)",
    )
    min_delta: float = Field(
        0.0, ge=0, description="an evaluation improves on the best only when it beats it by more than this"
    )
    metric: str = Field("val_loss", description="evaluation metric to watch (a key of the eval records)")
    mode: Literal["min", "max"] = Field("min", description="min = lower is better (losses), max = higher")
    restore_best: bool = Field(
        False,
        description="the run's model/ or adapter/ gets the best checkpoint's weights, not the last step's",
    )

    @property
    def active(self) -> bool:
        """Whether the best checkpoint is tracked at all."""
        return self.patience > 0 or self.restore_best


class BestTracker:
    """The best value of one metric so far, where it was reached, and how long since."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, results: dict[str, Any]) -> bool:
        """Record evaluation `results` of `step`; True when it is a new best."""
        value = results.get(self.cfg.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numbers = sorted(k for k, v in results.items() if isinstance(v, (int, float)) and k != "step")
            raise ConfigError(
                f"early_stopping.metric: {self.cfg.metric!r} is not a number the evaluation reports "
                f"(it reports {', '.join(numbers)})"
            )
        value = float(value)
        if self.best is None:
            better = math.isfinite(value)
        elif self.cfg.mode == "min":
            better = value < self.best - self.cfg.min_delta
        else:
            better = value > self.best + self.cfg.min_delta
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Patience used up: the run should stop."""
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def stop_event(self) -> dict[str, Any]:
        """The `event` record of metrics.jsonl that says the run stopped early."""
        return {
            "message": "early stopping",
            "metric": self.cfg.metric,
            "best": self.best,
            "best_step": self.best_step,
            "patience": self.cfg.patience,
        }

    def stop_message(self, step: int) -> str:
        best = "none finite" if self.best is None else f"{self.best:.4f} at step {self.best_step}"
        return (
            f"early stopping at step {step}: {self.cfg.metric} has not improved by more than "
            f"{self.cfg.min_delta} in {self.cfg.patience} evaluations; best {best}"
        )

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best = None if state.get("best") is None else float(state["best"])
            self.best_step = None if state.get("best_step") is None else int(state["best_step"])
            self.bad_evals = int(state.get("bad_evals", 0))
