"""A learned reward for GRPO: a reward model from `lmforge align reward` scores each completion.

    reward = RewardModelReward("runs/rm/model", batch_size=8)
    reward(["2+3="], ["5"], [{"prompt": "2+3="}])          # -> [score]

In a GRPO rewards list: `{kind: reward_model, path: runs/rm/model, weight: 1.0, batch_size: 8}`. A row's
chat prompt (its "prompt" field as a list of messages) is rendered with the chat template, as the
reward model was trained; otherwise the prompt string is used as plain text.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section
from lmforge.device import pick_device
from lmforge.model.reward import Prompt, load_reward_model, score_texts


class RewardModelRewardConfig(Section):
    kind: Literal["reward_model"]
    path: str = Field(..., description="reward model folder: <run>/model of `lmforge align reward`")
    weight: float = Field(1.0, description="weight of this reward in the sum")
    batch_size: int = Field(8, ge=1, description="completions scored per forward pass")


class RewardModelReward:
    """(prompts, completions, rows) -> one reward-model score per completion."""

    def __init__(self, path: str, batch_size: int = 8, device: str = "cpu") -> None:
        self.model, self.tok = load_reward_model(path, device=pick_device(device))
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        chat: list[Prompt] = [
            r["prompt"] if isinstance(r.get("prompt"), list) else p
            for p, r in zip(prompts, rows, strict=True)
        ]
        return score_texts(self.model, self.tok, chat, completions, self.batch_size)


__all__ = ["RewardModelReward", "RewardModelRewardConfig"]
