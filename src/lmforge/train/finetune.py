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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import capped, save_config
from lmforge.data.batch import IGNORE_INDEX
from lmforge.data.chat import Example, SFTData, collate, load_sft, pack
from lmforge.data.order import EpochOrder
from lmforge.io import atomic_write_json
from lmforge.model.hub import pinned
from lmforge.model.source import load_base
from lmforge.model.transformer import Transformer
from lmforge.plan.auto import auto_micro_batch, install_oom_backoff
from lmforge.train import distributed as D
from lmforge.train.common import parse_single_process, precision_setup
from lmforge.train.configs import FinetuneConfig
from lmforge.train.loop import LoopState, Trainer, settings_from
from lmforge.train.metrics import MetricsLogger, read_metrics
from lmforge.train.objectives import Batch, causal_lm
from lmforge.train.optim import build_optimizer
from lmforge.train.prepare import checkpoint_module, prepare_model
from lmforge.train.rundir import export_result, finish_run_dir, prepare_run_dir

COMMAND = "finetune"
SUMMARY = "summary.json"


CONFIG = FinetuneConfig
DESCRIPTION = (
    "Supervised fine-tuning on chat, prompt/completion or Alpaca JSONL: loss on assistant tokens only, "
    "packing without cross-example attention, full / LoRA / QLoRA, the shared training loop (exact resume, "
    "checkpoints with only the adapter for LoRA). Writes model/ (full) or adapter/ (LoRA, PEFT format). "
    "Exit codes: 0 ok, 2 user error, 3 integrity, 4 too many non-finite steps, 130 interrupted."
)
EXAMPLE = "lmforge finetune -c configs/finetune/demo-lora.yaml"


# -- model -------------------------------------------------------------------------------------------


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


# -- entry points ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    return train(parse_single_process(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE))


def train(cfg: FinetuneConfig, **trainer_kw: Any) -> int:
    """Run the configured fine-tuning in this process; returns the exit code (0)."""
    cfg = cfg.model_copy(update={"base": pinned(cfg.base)})  # a hub id's commit, saved in config.yaml
    info = D.DistInfo()
    torch.manual_seed(cfg.seed)  # LoRA dropout draws from the global RNG; checkpoints save its state
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    model, tok, cfg = _base_model(cfg, device)
    data = load_sft(cfg.data, tok, seq_len=cfg.seq_len, seed=cfg.seed)
    val = data.val[: cfg.eval.max_examples] if cfg.eval.max_examples else data.val
    train_model, summary = prepare_model(
        model,
        device=device,
        method=cfg.method,
        lora=cfg.lora,
        seed=cfg.seed,
        activation_checkpointing=cfg.activation_checkpointing,
        info=info,
    )
    assert summary is not None
    prec, _, autocast, scaler = precision_setup(cfg, device)
    auto_micro = cfg.micro_batch == "auto"
    if auto_micro:
        cfg = cfg.model_copy(update={"micro_batch": _auto_micro_batch(cfg, model, device, prec)})
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
        wandb_project=cfg.wandb_project,
        config=cfg.model_dump(mode="json"),
    )
    trainer = Trainer(
        model=saved,
        train_model=train_model,
        optimizer=optimizer,
        batches=batches,
        objective=causal_lm,
        settings=settings_from(cfg),
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
        install_oom_backoff(trainer, batches)
    trainer.resume_and_say(cfg.resume)
    _say_start(cfg, summary, data, batches, f"{prec} on {device}")
    try:
        state = trainer.run()
    finally:
        logger.close()
    _finish(cfg, run_dir, state, model, tok, {"trainable": summary, "data": data.stats})
    return 0


def _base_model(cfg: FinetuneConfig, device: torch.device) -> tuple[Transformer, Any, FinetuneConfig]:
    """The base model and tokenizer, and cfg with seq_len capped (with a notice) at a trained base's context."""
    folder = Path(cfg.base).is_dir()  # a trained base has its context; a preset is sized to seq_len
    model, tok = load_base(
        cfg.base,
        tokenizer=cfg.tokenizer,
        model_overrides=cfg.model_overrides,
        seq_len=0 if folder else cfg.seq_len,
        device=device,
        seed=cfg.seed,
    )
    limit = int(model.cfg.max_seq_len)
    cfg = cfg.model_copy(
        update={"seq_len": capped("seq_len", cfg.seq_len, limit, f"the context of {cfg.base}")}
    )
    return model, tok, cfg


def _auto_micro_batch(cfg: FinetuneConfig, model: Transformer, device: torch.device, prec: str) -> int:
    """micro_batch=auto: the planner's largest micro batch that fits this device (see lmforge.plan.auto)."""
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
        rollback=cfg.nonfinite_rollback,
    )
    print(f"micro_batch=auto: {micro} (predicted by the planner for {device})", file=sys.stderr)
    return micro


def _say_start(
    cfg: FinetuneConfig, summary: dict[str, Any], data: SFTData, batches: SFTBatches, where: str
) -> None:
    st = data.stats
    print(
        f"finetune ({cfg.method}): {summary['trainable']:,} of {summary['total']:,} parameters trainable "
        f"({summary['fraction']:.2%}); {st['train_examples']:,} train examples in {len(batches.rows):,} rows, "
        f"{st['val_examples']:,} validation; {st['truncated']} truncated to {cfg.seq_len + 1} tokens, "
        f"{st['dropped_no_targets']} dropped (no target left); {where}",
        file=sys.stderr,
    )


def _finish(
    cfg: FinetuneConfig, run_dir: Path, state: LoopState, model: nn.Module, tok: Any, report: dict[str, Any]
) -> None:
    """Export model/ or adapter/, write summary.json (validation before and after) and publish the run."""
    ckpt = run_dir / "checkpoints" / f"step-{state.model_step:06d}"
    out = export_result(run_dir, ckpt, model, tok, cfg.method, cfg.lora, cfg.base)
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    report = {**report, "steps": state.step, "tokens": state.tokens}
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


__all__ = [
    "CONFIG",
    "FinetuneConfig",
    "SFTBatches",
    "evaluate",
    "main",
    "train",
]
