"""`lmforge align reward`: a reward model (Bradley-Terry) on the chosen/rejected pairs DPO reads.

    lmforge align reward -c configs/align/reward-demo.yaml
    lmforge align reward model=runs/demo/pretrain data=prefs.jsonl output=runs/rm method=full

The model is the starting decoder with a scalar head (model/reward.py); a pair's loss is
-logsigmoid(r_chosen - r_rejected - margin), `margin` an optional number per record (0 without). LoRA
trains adapters on the decoder and the head in full; full trains every weight. Training is the shared
loop (train/loop.py): exact resume, checkpoints (LoRA: the adapters and the head only), metrics.jsonl with
the training reward accuracy and, on held-out pairs before training and at each evaluation, `val_accuracy`
(pairwise: the chosen response scores higher; a tie counts half), `val_loss`, `val_margin`.

The run directory gets config.yaml, metrics.jsonl, checkpoints/, report.json (held-out numbers before and
after) and model/: an HF LlamaForSequenceClassification folder (LoRA merged into full weights) that
`lmforge eval reward_model=...`, the GRPO reward `reward_model` and transformers load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import save_config
from lmforge.data.preference import (
    PairSampler,
    PreferenceStats,
    capped_max_len,
    fixed_batches,
    score_collate,
    train_and_held_pairs,
)
from lmforge.io import atomic_write_json
from lmforge.model.hub import pinned
from lmforge.model.lora import merge_lora
from lmforge.model.reward import RewardModel, save_reward_hf
from lmforge.model.source import load_merged_base
from lmforge.train import distributed as D
from lmforge.train.align_configs import RewardConfig
from lmforge.train.common import parse_single_process, precision_setup
from lmforge.train.loop import LoopState, Trainer, settings_from
from lmforge.train.metrics import MetricsLogger, read_metrics
from lmforge.train.objectives import Batch, RewardObjective, reward_metrics, reward_sums
from lmforge.train.optim import build_optimizer
from lmforge.train.prepare import checkpoint_module, prepare_model
from lmforge.train.rundir import finish_run_dir, prepare_run_dir

COMMAND = "align reward"
REPORT = "report.json"


CONFIG = RewardConfig
DESCRIPTION = (
    "Train a reward model on chosen/rejected pairs (plain text or chat; optional per-pair margin): the "
    "decoder with a scalar head, Bradley-Terry loss, LoRA (head in full) or full, on the shared training "
    "loop. Reports held-out pairwise accuracy before and after; writes model/, an HF "
    "...ForSequenceClassification folder. Exit codes: 0 ok, 2 user error, 3 integrity, 4 too many "
    "non-finite steps, 130 interrupted."
)
EXAMPLE = "lmforge align reward -c configs/align/reward-demo.yaml"


class RewardEval:
    """Held-out Bradley-Terry loss, pairwise accuracy, margin and mean scores on fixed batches."""

    def __init__(self, model: nn.Module, batches: list[Batch]) -> None:
        self.model, self.batches = model, batches
        self.objective = RewardObjective()

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        model = self.model  # the loop passes what checkpoints hold (only adapters + head, for LoRA)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(5, dtype=torch.float64)
        loss = 0.0
        for b in self.batches:
            losses, chosen, rejected = self.objective.pair_terms(
                model, {k: v.to(device) for k, v in b.items()}
            )
            sums += reward_sums(chosen, rejected)
            loss += float(losses.double().sum())
        model.train(was_training)
        n = max(int(sums[0]), 1)
        stats = reward_metrics(sums)
        return {
            "val_loss": loss / n,
            "val_accuracy": stats.get("reward_accuracy", 0.0),
            "val_margin": stats.get("reward_margin", 0.0),
            "val_chosen": stats.get("reward_chosen", 0.0),
            "val_rejected": stats.get("reward_rejected", 0.0),
            "val_pairs": int(sums[0]),
        }


def main(argv: list[str]) -> int:
    return train(parse_single_process(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE))


def train(cfg: RewardConfig, **trainer_kw: Any) -> int:
    """Run the configured reward-model training in this process; returns the exit code (0)."""
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})
    info = D.DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    backbone, tok, _ = load_merged_base(cfg.model, tokenizer=cfg.tokenizer, device=device, seed=cfg.seed)
    cfg = cfg.model_copy(update={"max_len": capped_max_len(cfg, int(backbone.cfg.max_seq_len))})
    train_pairs, held, stats = train_and_held_pairs(cfg, tok)
    model = RewardModel(backbone, tok.pad_id, seed=cfg.seed).train()
    train_model, summary = prepare_model(
        model, device=device, method=cfg.method, lora=cfg.lora, seed=cfg.seed
    )
    assert summary is not None
    if cfg.method == "lora":  # the head is new: it trains in full beside the adapters
        model.score.weight.requires_grad_(True)
        summary = _summary(model, cfg.method)
    prec, _, autocast, scaler = precision_setup(cfg, device)
    run_dir = prepare_run_dir(cfg, info)
    save_config(cfg, run_dir, COMMAND)
    eval_batches = [
        score_collate([held[i] for i in idx], tok.pad_id) for idx in fixed_batches(held, cfg.eval.batch_size)
    ]
    batches = PairSampler(
        train_pairs,
        global_batch=cfg.global_batch,
        micro_batch=cfg.micro_batch,
        pad_id=tok.pad_id,
        seed=cfg.seed,
        collate_fn=score_collate,
    )
    saved = checkpoint_module(model, cfg.method)
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
        optimizer=build_optimizer(saved, cfg.optim),
        batches=batches,
        objective=RewardObjective(),
        settings=settings_from(cfg, name=COMMAND, unit="pairs"),
        run_dir=run_dir,
        info=info,
        logger=logger,
        evaluator=RewardEval(model, eval_batches) if held else None,
        autocast=autocast,
        scaler=scaler,
        extra_state={"config": cfg.model_dump(mode="json"), "precision": prec, "method": cfg.method},
        **trainer_kw,
    )
    trainer.resume_and_say(cfg.resume)
    print(
        f"align reward ({cfg.method}): {summary['trainable']:,} of {summary['total']:,} parameters trainable "
        f"({summary['fraction']:.2%}); {len(train_pairs):,} training pairs, {len(held):,} held out; "
        f"{stats.truncated} truncated to {cfg.max_len} tokens, {stats.identical} skipped (chosen = rejected); "
        f"{prec} on {device}",
        file=sys.stderr,
    )
    try:
        state = trainer.run()
    finally:
        logger.close()
    merge_lora(model)  # the HF folder holds full weights (LoRA merged); checkpoints keep the adapters
    save_reward_hf(model, tok, run_dir / "model")
    _write_report(cfg, run_dir, state, summary, stats, len(train_pairs), len(held))
    finish_run_dir(run_dir, Path(cfg.output), COMMAND)
    print(f"wrote {cfg.output} (model/, step {state.step}, {state.tokens:,} pairs)")
    return 0


def _summary(model: nn.Module, method: str) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"method": method, "trainable": trainable, "total": total, "fraction": trainable / total}


def _write_report(
    cfg: RewardConfig,
    run_dir: Path,
    state: LoopState,
    summary: dict[str, Any],
    stats: PreferenceStats,
    train_pairs: int,
    held_out: int,
) -> None:
    """report.json: settings, data counts and the held-out numbers before and after training."""
    report: dict[str, Any] = {
        "method": cfg.method,
        "saved": "model/: full weights (LoRA merged), HF sequence-classification folder",
        "trainable": summary,
        "data": {k: int(v) for k, v in vars(stats).items()},
        "train_pairs": train_pairs,
        "held_out_pairs": held_out,
        "steps": state.step,
        "pairs_seen": state.tokens,
    }
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    if evals:
        first, last = evals[0], evals[-1]
        for name, row in (("before", first), ("after", last)):
            report[name] = {
                k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_") or k == "step"
            }
        print(
            f"held-out: pairwise accuracy {first['val_accuracy']:.1%} -> {last['val_accuracy']:.1%}, margin "
            f"{first['val_margin']:.3f} -> {last['val_margin']:.3f}, loss {first['val_loss']:.4f} -> "
            f"{last['val_loss']:.4f} (step {first['step']} -> {last['step']})"
        )
    atomic_write_json(run_dir / REPORT, report)


__all__ = ["CONFIG", "RewardConfig", "RewardEval", "main", "train"]
