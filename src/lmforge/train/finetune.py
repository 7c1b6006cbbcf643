"""`lmforge finetune`: supervised fine-tuning (full, LoRA or QLoRA) of a model on chat / instruction data.

    lmforge finetune -c configs/finetune/demo-lora.yaml
    lmforge finetune -c cfg.yaml method=full optim.lr=2e-5 --resume auto

The base model is an HF folder, an lmforge model folder / run directory / checkpoint (anything
`lmforge generate` loads), or a preset name (random weights, for tests); its tokenizer comes with it.
Training is the shared loop (train/loop.py) with the masked causal-LM objective on SFT rows (data/chat.py),
so checkpoints, exact resume, non-finite step skipping and signals behave as in pretraining. For LoRA and
QLoRA the checkpoints hold only the adapter tensors and their optimizer state.

The run directory gets config.yaml, metrics.jsonl, checkpoints/, summary.json and, at the end, `model/`
(full: weights + model_config.json + tokenizer, loadable by generate/chat/serve/eval) or `adapter/` (LoRA,
PEFT format, plus the tokenizer; `lmforge lora merge` turns it into a model). Exit codes as pretrain.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lmforge.config import Section, parse_command, save_config
from lmforge.data.chat import Example, SFTDataConfig, collate, load_sft, pack
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_json
from lmforge.model.lora import LoraConfig
from lmforge.model.source import load_base
from lmforge.train import distributed as D
from lmforge.train.objectives import IGNORE_INDEX, Batch, causal_lm
from lmforge.train.optim import OptimConfig
from lmforge.train.pretrain import CheckpointConfig
from lmforge.train.sampler import EpochOrder
from lmforge.train.schedule import ScheduleConfig

COMMAND = "finetune"
SUMMARY = "summary.json"


class FinetuneEvalConfig(Section):
    every: int = Field(
        50, ge=0, description="validation loss + exact match every N steps (0 = only at the end)"
    )
    batch_size: int = Field(8, ge=1, description="validation examples per forward pass")
    max_examples: int = Field(
        256, ge=0, description="evaluate on at most this many validation examples (0 = all)"
    )


class FinetuneConfig(Section):
    base: str = Field(
        ...,
        description="base model: HF folder, lmforge model folder / run dir / checkpoint, or a preset (random init)",
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer folder (null = the one that comes with the base model; needed for presets)",
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="preset bases only: ModelConfig fields to change, e.g. {n_layers: 2}",
    )
    output: str = Field(..., description="run directory (checkpoints, metrics, final model or adapter)")
    data: SFTDataConfig
    method: Literal["full", "lora", "qlora"] = Field(
        "lora",
        description="full = every weight; lora = low-rank adapters on a frozen base; qlora = on an NF4 base",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape (method lora/qlora)")
    seq_len: int = Field(512, ge=8, description="tokens per training row; longer examples are truncated")
    global_batch: int = Field(16, ge=1, description="rows per optimizer step")
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        4,
        description="rows per forward pass; auto = the largest that `lmforge plan` predicts to fit, halved "
        "on a GPU out-of-memory error (global batch unchanged)",
    )
    max_steps: int = Field(100, ge=1, description="optimizer steps to train")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0), description="AdamW settings"
    )
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(warmup_steps=10), description="learning-rate schedule"
    )
    eval: FinetuneEvalConfig = Field(default_factory=FinetuneEvalConfig, description="validation")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpointing")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward: less activation memory, ~30% more compute"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    seed: int = Field(0, description="seeds data order, adapter init and dropout")
    resume: str | None = Field(
        None, description="'auto' (newest checkpoint of this run) or a checkpoint path"
    )
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    tensorboard: bool = Field(True, description="also log to <output>/tensorboard")
    progress: bool = Field(True, description="show a progress bar (or log lines when not a terminal)")
    overwrite: bool = Field(False, description="replace an existing finished output directory")

    @model_validator(mode="after")
    def _divisible(self) -> FinetuneConfig:
        if isinstance(self.micro_batch, int) and self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        return self


CONFIG = FinetuneConfig
DESCRIPTION = (
    "Supervised fine-tuning on chat, prompt/completion or Alpaca JSONL: loss on assistant tokens only, "
    "packing without cross-example attention, full / LoRA / QLoRA, the shared training loop (exact resume, "
    "checkpoints with only the adapter for LoRA). Writes model/ (full) or adapter/ (LoRA, PEFT format). "
    "Exit codes: 0 ok, 2 user error, 3 integrity, 4 too many non-finite steps, 130 interrupted."
)
EXAMPLE = "lmforge finetune -c configs/finetune/demo-lora.yaml"


# -- model -------------------------------------------------------------------------------------------
def setup_method(model: nn.Module, method: str, lora: LoraConfig, seed: int = 0) -> dict[str, Any]:
    """Make the right parameters trainable; {"trainable", "total", "fraction", "method"}."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return {"method": method, "trainable": n, "total": n, "fraction": 1.0}
    from lmforge.model.lora import apply_lora

    summary = apply_lora(model, lora, quantize_base=method == "qlora", seed=seed)
    return {"method": method, **summary}


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
    return model if method == "full" else TrainableView(model)


# -- objective, batches, validation -------------------------------------------------------------------
class SFTBatches:
    """Global batch `step` -> micro batches of SFT rows: a seeded pure function of the step (exact resume).

    Each epoch visits every row once in the order of `np.random.default_rng([seed, epoch])`, as the
    pretraining sampler does; a row is one example or several packed ones."""

    def __init__(
        self,
        examples: list[Example],
        *,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        pad_id: int,
        packed: bool,
        seed: int = 0,
        window: int | None = None,
    ) -> None:
        self.examples = examples
        self.rows = pack(examples, seq_len) if packed else [[i] for i in range(len(examples))]
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.pad_id, self.packed, self.seed, self.window = pad_id, packed, seed, window
        self.order = EpochOrder(len(self.rows), seed)

    def row_indices(self, step: int) -> list[int]:
        return [int(i) for i in self.order.batch(step, self.global_batch)]

    def micro_batches(self, step: int) -> list[Batch]:
        rows = [[self.examples[i] for i in self.rows[r]] for r in self.row_indices(step)]
        return [
            collate(rows[m : m + self.micro_batch], self.pad_id, packed=self.packed, window=self.window)
            for m in range(0, len(rows), self.micro_batch)
        ]

    def state(self, step: int) -> dict[str, int]:
        return {"seed": self.seed, "step": step, "global_batch": self.global_batch, "rows": len(self.rows)}


class SFTValidation:
    """Masked validation loss and exact match over a fixed set of validation examples.

    Exact match: every target token is the model's argmax given the reference prefix (teacher forcing).
    For an example with one assistant reply this is the same as "greedy decoding of the prompt reproduces
    the reply, end-of-turn marker included", at the cost of one forward pass."""

    def __init__(self, model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> None:
        self.model, self.examples, self.batch_size, self.pad_id = model, examples, batch_size, pad_id

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        # `model` is the loop's checkpoint module (for LoRA only the adapters): evaluate the whole model.
        return evaluate(self.model, self.examples, self.batch_size, self.pad_id)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, exact = 0.0, 0, 0
    for b in range(0, len(examples), batch_size):
        batch = collate([[e] for e in examples[b : b + batch_size]], pad_id, packed=False)
        labels = batch["labels"].to(device)
        logits = model(batch["input_ids"].to(device)).float()  # (B, T, V)
        targets = labels != IGNORE_INDEX
        total += float(
            F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int(targets.sum())
        right = (logits.argmax(-1) == labels) | ~targets
        exact += int(right.all(dim=1).sum())
    model.train(was_training)
    return {
        "val_loss": total / max(count, 1),
        "val_exact_match": exact / max(len(examples), 1),
        "val_tokens": count,
    }


# -- outputs -----------------------------------------------------------------------------------------
def export_result(
    run_dir: Path, ckpt: Path, model: nn.Module, tok: Any, method: str, lora: LoraConfig, base: str
) -> Path:
    """model/ (full: weights + model_config.json + tokenizer) or adapter/ (PEFT adapter + tokenizer).

    `base`: what the run started from, recorded for `lmforge lora merge` (resolved when a folder)."""
    if method == "full":
        from lmforge.train.pretrain import export_final

        export_final(run_dir, ckpt, model, None)
        out = run_dir / "model"
    else:
        from lmforge.model.lora import save_adapter

        out = run_dir / "adapter"
        base = str(Path(base).resolve()) if Path(base).is_dir() else base
        save_adapter(model, lora, out, base_model=base)
        # Read by `lmforge lora merge`: which base, and whether it was NF4 (qlora) in training.
        atomic_write_json(out / "lmforge_base.json", {"base": base, "method": method})
    tok.save(out)
    return out


def parse_single_process(
    argv: list[str], schema: type[Any], command: str, description: str, example: str
) -> Any:
    """`parse_command` for a command that runs in one process: `--nproc N` with N > 1 is refused."""
    from lmforge.train.pretrain import _split_flags

    rest, nproc = _split_flags(argv)
    if nproc not in (None, 1):
        raise ConfigError(f"--nproc: {command} runs in one process")
    return parse_command(rest, schema, command, description, example)


# -- entry points ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    return train(parse_single_process(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE))


def train(cfg: FinetuneConfig, **trainer_kw: Any) -> int:
    """Run the configured fine-tuning in this process; returns the exit code (0)."""
    from lmforge.train.loop import Trainer, settings_from
    from lmforge.train.metrics import MetricsLogger
    from lmforge.train.optim import build_optimizer
    from lmforge.train.pretrain import (
        apply_activation_checkpointing,
        finish_run_dir,
        precision_setup,
        prepare_run_dir,
    )

    info = D.DistInfo()
    torch.manual_seed(cfg.seed)  # LoRA dropout draws from the global RNG; checkpoints save its state
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    model, tok = load_base(
        cfg.base,
        tokenizer=cfg.tokenizer,
        model_overrides=cfg.model_overrides,
        seq_len=cfg.seq_len,
        device=device,
        seed=cfg.seed,
    )
    data = load_sft(cfg.data, tok, seq_len=cfg.seq_len, seed=cfg.seed)
    val = data.val[: cfg.eval.max_examples] if cfg.eval.max_examples else data.val
    summary = setup_method(model, cfg.method, cfg.lora, cfg.seed)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    prec, _, autocast, scaler = precision_setup(cfg, device)
    auto_micro = cfg.micro_batch == "auto"
    if auto_micro:
        from lmforge.plan.auto import auto_micro_batch

        micro = auto_micro_batch(
            model.cfg,
            seq_len=cfg.seq_len,
            global_batch=cfg.global_batch,
            world=1,
            device=device,
            precision=prec,
            checkpointing=cfg.activation_checkpointing,
            fsdp=False,
            method=cfg.method,
            lora_rank=cfg.lora.rank,
        )
        print(f"micro_batch=auto: {micro} (predicted by the planner for {device})", file=sys.stderr)
        cfg = cfg.model_copy(update={"micro_batch": micro})
    assert isinstance(cfg.micro_batch, int)
    batches = SFTBatches(
        data.train,
        seq_len=cfg.seq_len,
        global_batch=cfg.global_batch,
        micro_batch=cfg.micro_batch,
        pad_id=tok.pad_id,
        packed=cfg.data.packing,
        seed=cfg.seed,
        window=model.cfg.sliding_window,
    )
    saved = checkpoint_module(model, cfg.method)
    optimizer = build_optimizer(saved, cfg.optim)
    run_dir = prepare_run_dir(cfg, info)
    save_config(cfg, run_dir, COMMAND)
    logger = MetricsLogger(
        run_dir,
        enabled=True,
        tensorboard=cfg.tensorboard,
        wandb_project=None,
        config=cfg.model_dump(mode="json"),
    )
    settings = settings_from(cfg)
    trainer = Trainer(
        model=saved,
        train_model=model,
        optimizer=optimizer,
        batches=batches,
        objective=causal_lm,
        settings=settings,
        run_dir=run_dir,
        info=info,
        logger=logger,
        evaluator=SFTValidation(model, val, cfg.eval.batch_size, tok.pad_id) if val else None,
        autocast=autocast,
        scaler=scaler,
        extra_state={"config": cfg.model_dump(mode="json"), "precision": prec, "method": cfg.method},
        **trainer_kw,
    )
    if auto_micro:
        from lmforge.plan.auto import install_oom_backoff

        install_oom_backoff(trainer, batches)
    trainer.resume_and_say(cfg.resume)
    st = data.stats
    print(
        f"finetune ({cfg.method}): {summary['trainable']:,} of {summary['total']:,} parameters trainable "
        f"({summary['fraction']:.2%}); {st['train_examples']:,} train examples in {len(batches.rows):,} rows, "
        f"{st['val_examples']:,} validation; {st['truncated']} truncated to {cfg.seq_len + 1} tokens, "
        f"{st['dropped_no_targets']} dropped (no target left); {prec} on {device}",
        file=sys.stderr,
    )
    try:
        state = trainer.run()
    finally:
        logger.close()
    ckpt = run_dir / "checkpoints" / f"step-{state.step:06d}"
    out = export_result(run_dir, ckpt, model, tok, cfg.method, cfg.lora, cfg.base)
    from lmforge.train.metrics import read_metrics

    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    report: dict[str, Any] = {"trainable": summary, "data": st, "steps": state.step, "tokens": state.tokens}
    if evals:
        first, last = evals[0], evals[-1]
        report["val_before"] = {k: first[k] for k in ("step", "val_loss", "val_exact_match")}
        report["val_after"] = {k: last[k] for k in ("step", "val_loss", "val_exact_match")}
        print(
            f"validation: loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}, exact match "
            f"{first['val_exact_match']:.1%} -> {last['val_exact_match']:.1%} (step {first['step']} -> {last['step']})"
        )
    atomic_write_json(run_dir / SUMMARY, report)
    finish_run_dir(run_dir, Path(cfg.output), COMMAND)
    print(f"wrote {cfg.output} ({out.name}/, step {state.step}, {state.tokens:,} target tokens)")
    return 0


__all__ = [
    "CONFIG",
    "FinetuneConfig",
    "SFTBatches",
    "TrainableView",
    "checkpoint_module",
    "evaluate",
    "main",
    "setup_method",
    "train",
]
