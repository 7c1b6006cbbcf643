"""The config schemas of `align reward` and `align grpo`, apart from their commands so that the sweep can
resolve a trial config's paths with them (it may not import the command modules, which are leaves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config import ConfigPath, ConfigRef, Section
from lmforge.data.hfdata import HFDataConfig
from lmforge.model.lora import LoraConfig
from lmforge.train.common import TrainConfig
from lmforge.train.optim import OptimConfig


class RewardEvalConfig(Section):
    every: int = Field(
        50, ge=0, description="held-out pairwise accuracy and loss every N steps (0 = at the end)"
    )
    batch_size: int = Field(8, ge=1, description="held-out pairs per forward pass")
    max_pairs: int = Field(256, ge=0, description="evaluate on at most this many held-out pairs (0 = all)")


class RewardConfig(TrainConfig):
    model: ConfigRef = Field(
        ...,
        description="decoder to start from: HF folder, hub id ORG/NAME[@REV], lmforge model folder, "
        "pretrain/finetune run dir (its model/, or its LoRA adapter/ merged into the base) or checkpoint",
    )
    tokenizer: ConfigRef | None = Field(
        None, description="tokenizer folder (null = the one that comes with the model)"
    )
    data: ConfigPath = Field(
        ...,
        description='preference JSONL: {"prompt", "chosen", "rejected"} (text or chat messages), optional '
        'numeric "margin"',
    )
    eval_data: ConfigPath | None = Field(
        None, description="held-out preference JSONL (null = hold out eval_fraction)"
    )
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset inputs: split, columns, streaming"
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of `data` held out (seeded) when eval_data is null; 0 = none"
    )
    output: ConfigPath = Field(..., description="run directory (checkpoints, metrics, report, model/)")
    method: Literal["full", "lora"] = Field(
        "lora", description="full = every weight; lora = adapters on a frozen decoder, the score head in full"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (method lora)")
    max_len: int = Field(
        512, ge=8, description="tokens per sequence (prompt + response); longer pairs are cut"
    )
    max_prompt_len: int = Field(
        256, ge=1, description="a cut pair keeps at most this many prompt tokens (its end)"
    )
    append_eos: bool = Field(True, description="plain-text records: end each response with EOS")
    global_batch: int = Field(16, ge=1, description="pairs per optimizer step")
    micro_batch: int = Field(4, ge=1, description="pairs per forward pass (2 sequences each)")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0), description="AdamW settings"
    )
    eval: RewardEvalConfig = Field(default_factory=RewardEvalConfig, description="held-out evaluation")
    seed: int = Field(0, description="seeds the held-out split, pair order, head and adapter init")
    log_every: int = Field(10, ge=1, description="log training loss and reward accuracy every N steps")

    @model_validator(mode="after")
    def _prompt_fits(self) -> RewardConfig:
        if self.max_prompt_len >= self.max_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be below max_len ({self.max_len})")
        return self


class GRPOEvalConfig(Section):
    every: int = Field(0, ge=0, description="held-out greedy reward every N steps (0 = at the start and end)")
    max_prompts: int = Field(64, ge=0, description="evaluate on at most this many held-out prompts (0 = all)")


class GRPOConfig(TrainConfig):
    model: ConfigRef = Field(
        ...,
        description="policy to start from: HF folder, hub id, lmforge model folder, pretrain/finetune run dir "
        "(its model/, or its LoRA adapter/ merged into the base) or checkpoint",
    )
    tokenizer: ConfigRef | None = Field(None, description="tokenizer folder (null = the model's)")
    data: ConfigPath = Field(
        ...,
        description='prompts JSONL or Hugging Face dataset (hf:ORG/NAME, save_to_disk folder, .arrow): {"prompt": text or messages} or {"messages": [...]}, plus fields',
    )
    eval_data: ConfigPath | None = Field(
        None, description="held-out prompts JSONL or dataset (null = no evaluation)"
    )
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset inputs: split, columns, streaming"
    )
    output: ConfigPath = Field(
        ..., description="run directory (checkpoints, metrics, report, model/ or adapter/)"
    )
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full = every weight; lora = adapters on a frozen base; qlora = on an NF4 base"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (method lora/qlora)")
    rewards: list[dict[str, Any]] = Field(
        ...,
        description="reward functions, summed with their weights: kinds exact_match, numeric_match, regex, "
        "length, python, code (unit tests in a sandbox), reward_model (see docs/rl.md)",
    )
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (G)")
    global_batch: int = Field(
        32, ge=1, description="completions per optimizer step (a multiple of group_size and micro_batch)"
    )
    micro_batch: int = Field(8, ge=1, description="completions per forward pass")
    max_prompt_len: int = Field(256, ge=1, description="longer prompts keep their last tokens")
    max_new_tokens: int = Field(128, ge=1, description="most tokens per completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts")
    top_k: int = Field(0, ge=0, description="top-k sampling of the rollouts (0 = off)")
    gen_batch: int = Field(64, ge=1, description="sequences the engine generates at once")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference (0 = no reference forward)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip range below 1 of the importance ratio")
    epsilon_high: float | None = Field(None, gt=0, description="clip range above 1 (null = epsilon)")
    num_iterations: int = Field(1, ge=1, description="optimizer steps (passes) per generated batch")
    scale_rewards: bool = Field(True, description="divide advantages by the group's std (false = Dr. GRPO)")
    loss_type: Literal["token", "sequence"] = Field(
        "token",
        description="token = mean over all completion tokens; sequence = mean of per-completion means",
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0), description="AdamW settings"
    )
    eval: GRPOEvalConfig = Field(default_factory=GRPOEvalConfig, description="held-out evaluation")
    seed: int = Field(0, description="seeds the prompt order, the sampling and adapter init")
    log_every: int = Field(1, ge=1, description="log training metrics every N steps")
