"""The configs of the pretraining and fine-tuning commands: a library module, so that the planner can
check its overlays against them (it may not import the command modules, which are leaves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from lmforge.config import Section
from lmforge.data.chat import SFTDataConfig
from lmforge.model.lora import LoraConfig
from lmforge.train.common import TrainConfig
from lmforge.train.distributed import DistConfig
from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig


class EvalConfig(Section):
    every: int = Field(100, ge=0, description="evaluate every N steps (0 = only at the end)")
    batches: int = Field(16, ge=1, description="validation batches per evaluation (fixed windows)")
    batch_size: int = Field(8, ge=1, description="sequences per validation batch")
    prompts: list[str] = Field(
        default_factory=lambda: ["The ", "And "], description="prompts for sampled generations"
    )
    sample_tokens: int = Field(48, ge=0, description="tokens to generate per prompt (0 = no samples)")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(40, ge=0, description="sample from the k most likely tokens (0 = all)")


class PretrainConfig(TrainConfig):
    data: str = Field(..., description="tokens directory written by `lmforge tokenize`")
    output: str = Field(..., description="run directory (checkpoints, metrics, final model)")
    model: str = Field(
        "tiny",
        description="a preset name (tiny, small, gpt2-124m, ...), a model YAML, an HF folder or hub id ORG/NAME[@REV]",
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="ModelConfig fields to change, e.g. {n_layers: 4}"
    )
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    global_batch: int = Field(32, ge=1, description="sequences per optimizer step, all processes together")
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8,
        description="sequences per forward pass on one process; auto = the largest that `lmforge plan` "
        "predicts to fit, halved on a GPU out-of-memory error (global batch unchanged)",
    )
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()
    activation_checkpointing: bool = Field(False, description="recompute each block in backward")
    compile: bool = Field(False, description="torch.compile the model (slow first step)")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per process (null = torch default)"
    )
    seed: int = Field(0, description="seeds weights, data order and dropout")
    nproc: int = Field(1, ge=1, description="processes on this machine; >1 launches torchrun")
    verify_input: bool = Field(True, description="check the tokens directory against its manifest")


class FinetuneEvalConfig(Section):
    every: int = Field(
        50, ge=0, description="validation loss + exact match every N steps (0 = only at the end)"
    )
    batch_size: int = Field(8, ge=1, description="validation examples per forward pass")
    max_examples: int = Field(
        256, ge=0, description="evaluate on at most this many validation examples (0 = all)"
    )


class FinetuneConfig(TrainConfig):
    base: str = Field(
        ...,
        description="base model: HF folder, hub id ORG/NAME[@REV] (pinned to its commit in config.yaml), lmforge "
        "model folder / run dir / checkpoint, or a preset (random init)",
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer folder (null = the one that comes with the base model; needed for presets)",
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="preset bases only: ModelConfig fields to change, e.g. {n_layers: 2}",
    )
    data: SFTDataConfig
    method: Literal["full", "lora", "qlora"] = Field(
        "lora",
        description="full = every weight; lora = low-rank adapters on a frozen base; qlora = on an NF4 base",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (method lora/qlora)")
    seq_len: int = Field(512, ge=8, description="tokens per training row; longer examples are truncated")
    eval: FinetuneEvalConfig = Field(default_factory=FinetuneEvalConfig, description="validation")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward: less activation memory, ~30% more compute"
    )
    seed: int = Field(0, description="seeds data order, adapter init and dropout")


__all__ = ["EvalConfig", "FinetuneConfig", "FinetuneEvalConfig", "PretrainConfig"]
