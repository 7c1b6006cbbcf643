"""The configs of the pretraining, fine-tuning and DPO commands: a library module, so that the planner can
check its overlays against them (it may not import the command modules, which are leaves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from lmforge.config import ConfigPath, ConfigRef, Section
from lmforge.data.chat import SFTDataConfig
from lmforge.data.hfdata import HFDataConfig
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
    data: ConfigPath = Field(..., description="tokens directory written by `lmforge tokenize`")
    output: ConfigPath = Field(..., description="run directory (checkpoints, metrics, final model)")
    model: ConfigRef = Field(
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
    base: ConfigRef = Field(
        ...,
        description="base model: HF folder, hub id ORG/NAME[@REV] (pinned to its commit in config.yaml), lmforge "
        "model folder / run dir / checkpoint, or a preset (random init)",
    )
    tokenizer: ConfigRef | None = Field(
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


class DPOEvalConfig(Section):
    every: int = Field(
        50, ge=0, description="held-out reward accuracy and margins every N steps (0 = at the end)"
    )
    batch_size: int = Field(8, ge=1, description="held-out pairs per forward pass")
    max_pairs: int = Field(256, ge=0, description="evaluate on at most this many held-out pairs (0 = all)")


class DPOConfig(TrainConfig):
    model: ConfigRef = Field(
        ...,
        description="policy to start from: HF folder, hub id ORG/NAME[@REV], lmforge model folder, pretrain/finetune run dir "
        "(its model/, or its LoRA adapter/ merged into the base) or checkpoint",
    )
    tokenizer: ConfigRef | None = Field(
        None, description="tokenizer folder (null = the one that comes with the model)"
    )
    data: ConfigPath = Field(
        ...,
        description="preference JSONL or Hugging Face dataset (hf:ORG/NAME, save_to_disk folder, .arrow): "
        '{"prompt", "chosen", "rejected"}, text or chat messages',
    )
    eval_data: ConfigPath | None = Field(
        None,
        description="held-out preference JSONL or dataset, e.g. `hf:ORG/NAME#test` (null = eval_fraction)",
    )
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset inputs: split, columns, streaming"
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of `data` held out (seeded) when eval_data is null; 0 = none"
    )
    output: ConfigPath = Field(
        ..., description="run directory (checkpoints, metrics, report, model/ or adapter/)"
    )
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full = every weight; lora = adapters on a frozen base; qlora = on an NF4 base"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (method lora/qlora)")
    beta: float = Field(
        0.1, gt=0, description="strength of the KL tie to the reference: higher = stay closer to it"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed probability that a pair's label is flipped"
    )
    reference: Literal["precompute", "live"] = Field(
        "precompute",
        description="precompute = reference log-probs once before training (stored, reused on resume); "
        "live = every step (LoRA: adapters off; full: a frozen copy of the model in memory)",
    )
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
        default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.0), description="AdamW settings"
    )
    eval: DPOEvalConfig = Field(default_factory=DPOEvalConfig, description="held-out evaluation")
    seed: int = Field(0, description="seeds the held-out split, pair order and adapter init")
    log_every: int = Field(10, ge=1, description="log training loss and reward statistics every N steps")

    @model_validator(mode="after")
    def _prompt_fits(self) -> DPOConfig:
        # TrainConfig's validator has already checked global_batch against micro_batch
        if self.max_prompt_len >= self.max_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be below max_len ({self.max_len})")
        return self


__all__ = [
    "DPOConfig",
    "DPOEvalConfig",
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneEvalConfig",
    "PretrainConfig",
]
