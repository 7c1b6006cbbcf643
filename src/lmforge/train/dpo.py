"""`lmforge align dpo`: direct preference optimisation (Rafailov et al. 2023) on chosen/rejected pairs.

    lmforge align dpo -c configs/align/dpo-demo.yaml
    lmforge align dpo -c cfg.yaml method=full beta=0.2 --resume auto

The policy starts from a model folder (HF or lmforge), a pretraining or fine-tuning run (its model/, or
its adapter/ merged into the base), or a checkpoint. The reference policy is the starting model:
- LoRA / QLoRA: the same model with its adapters switched off (`adapters_disabled`), no second copy;
- full: a frozen copy (reference=live) or, by default, nothing at all: with reference=precompute the
  reference log-probs of every pair are computed once before training, stored in the run directory
  (reference.safetensors) and reused on resume.
Training is the shared loop (train/loop.py) with the DPO objective (train/objectives.py); the loss is
normalised per pair. Checkpoints hold the adapter only for LoRA, resume is exact. Reward accuracy, margin
and chosen/rejected rewards (beta * (log pi - log ref)) are logged at each log step and on held-out pairs.

The run directory gets config.yaml, metrics.jsonl, checkpoints/, reference.safetensors, report.json (the
held-out numbers before and after) and `model/` (full) or `adapter/` (LoRA, PEFT format). Exit codes as
for pretrain: 0 ok, 2 user error, 3 integrity, 4 too many non-finite steps, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import save_config
from lmforge.data.preference import (
    Pair,
    PairSampler,
    PreferenceStats,
    capped_max_len,
    collate,
    fixed_batches,
    train_and_held_pairs,
)
from lmforge.errors import IntegrityError
from lmforge.io import atomic_write_json, sha256_file
from lmforge.model.hub import pinned
from lmforge.model.lora import adapters_disabled, read_adapter_config
from lmforge.model.source import load_merged_base
from lmforge.model.tensorfile import load_tensors, read_metadata, save_tensors
from lmforge.progress import Progress
from lmforge.train import distributed as D
from lmforge.train.common import parse_single_process, precision_setup
from lmforge.train.configs import DPOConfig
from lmforge.train.loop import LoopState, Trainer, settings_from
from lmforge.train.metrics import MetricsLogger, read_metrics
from lmforge.train.objectives import (
    Batch,
    DPOObjective,
    Reference,
    reward_metrics,
    reward_sums,
    sequence_logps,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.prepare import checkpoint_module, prepare_model
from lmforge.train.rundir import export_result, finish_run_dir, prepare_run_dir

COMMAND = "align dpo"
REFERENCE_FILE = "reference.safetensors"
REPORT = "report.json"


CONFIG = DPOConfig
DESCRIPTION = (
    "Direct preference optimisation on chosen/rejected pairs (plain text or chat): full, LoRA or QLoRA on the "
    "shared training loop; the reference is the starting model (adapters off for LoRA, precomputed "
    "log-probs or a frozen copy for full). Logs reward accuracy and margins; writes model/ or adapter/ and "
    "report.json. Exit codes: 0 ok, 2 user error, 3 integrity, 4 too many non-finite steps, 130 interrupted."
)
EXAMPLE = "lmforge align dpo -c configs/align/dpo-demo.yaml"


# -- model -------------------------------------------------------------------------------------------
def load_policy(cfg: DPOConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """(model in train mode, tokenizer); a LoRA fine-tuning result is merged into its base first."""
    model, tok, adapter = load_merged_base(cfg.model, tokenizer=cfg.tokenizer, device=device, seed=cfg.seed)
    if adapter is not None:
        base = read_adapter_config(adapter).get("base_model_name_or_path")
        print(f"align dpo: merged the adapter {adapter} into {base}", file=sys.stderr)
    return model, tok


# -- reference log-probs -----------------------------------------------------------------------------
def reference_scope(model: nn.Module, method: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """What turns the policy into the reference: adapters off for LoRA; the untrained model for full."""
    if method == "full":
        return contextlib.nullcontext
    return lambda: adapters_disabled(model)


@torch.no_grad()
def compute_reference(
    model: nn.Module,
    scope: Callable[[], contextlib.AbstractContextManager[Any]],
    batches: list[Batch],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    what: str,
    progress: bool,
) -> torch.Tensor:
    """(pairs, 2) reference log-probs [chosen, rejected] of the pairs of `batches`, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with Progress(f"reference log-probs ({what})", len(batches), "batches", enabled=progress) as bar:
        for b in batches:
            with scope(), autocast():
                lp = sequence_logps(model, b["input_ids"].to(device), b["labels"].to(device)).float().cpu()
            m = lp.shape[0] // 2
            out.append(torch.stack([lp[:m], lp[m:]], dim=1))
            bar.advance()
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def fingerprint(cfg: DPOConfig) -> str:
    """What the stored reference log-probs depend on: data files, tokenisation, split, model, method."""
    keys = (
        "model",
        "tokenizer",
        "eval_fraction",
        "method",
        "max_len",
        "max_prompt_len",
        "append_eos",
        "seed",
    )
    parts: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    parts["lora"] = cfg.lora.model_dump(mode="json") if cfg.method != "full" else None
    parts["eval"] = [cfg.eval.batch_size, cfg.eval.max_pairs]
    parts["data"] = sha256_file(Path(cfg.data))
    parts["eval_data"] = sha256_file(Path(cfg.eval_data)) if cfg.eval_data else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def stored_reference(
    run_dir: Path, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The run's reference log-probs: read back if stored for the same `key`, else computed and stored."""
    path = run_dir / REFERENCE_FILE
    if path.is_file():
        stored = read_metadata(path).get("fingerprint")
        if stored != key:
            raise IntegrityError(
                f"{path}: computed for other data or settings than this config; continue the run with the "
                "config it started with, or start over with overwrite=true"
            )
        return load_tensors(path)
    tensors = compute()
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"fingerprint": key})
    return tensors


# -- evaluation --------------------------------------------------------------------------------------
class PreferenceEval:
    """DPO loss, reward accuracy / margin / chosen and rejected rewards on fixed held-out batches.

    `logp_accuracy` is the share of pairs where the policy itself gives the chosen response the higher
    log-probability: the model's raw preference, meaningful before training too (rewards are then 0)."""

    def __init__(self, model: nn.Module, objective: DPOObjective, batches: list[Batch]) -> None:
        self.model, self.objective, self.batches = model, objective, batches

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        model = self.model  # the loop passes what checkpoints hold (only the adapter, for LoRA)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(5, dtype=torch.float64)
        loss, logp_wins = 0.0, 0
        for b in self.batches:
            losses, chosen, rejected, logps = self.objective.pair_terms(
                model, {k: v.to(device) for k, v in b.items()}
            )
            sums += reward_sums(chosen, rejected)
            loss += float(losses.double().sum())
            m = losses.shape[0]
            logp_wins += int((logps[:m] > logps[m:]).sum())
        model.train(was_training)
        n = max(int(sums[0]), 1)
        out: dict[str, Any] = {"val_loss": loss / n}
        out.update({f"val_{k}": v for k, v in reward_metrics(sums).items()})
        out.update(val_logp_accuracy=logp_wins / n, val_pairs=int(sums[0]))
        return out


# -- outputs -----------------------------------------------------------------------------------------
def _stats(s: PreferenceStats) -> dict[str, int]:
    return {k: int(v) for k, v in vars(s).items()}


# -- entry points ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    return train(parse_single_process(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE))


def train(cfg: DPOConfig, **trainer_kw: Any) -> int:
    """Run the configured DPO training in this process; returns the exit code (0)."""
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})  # a hub id's commit, saved in config.yaml
    info = D.DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    model, tok = load_policy(cfg, device)
    limit = int(getattr(model, "cfg").max_seq_len)  # noqa: B009 - typed loosely
    cfg = cfg.model_copy(update={"max_len": capped_max_len(cfg, limit)})
    train_pairs, held, stats = train_and_held_pairs(cfg, tok)

    train_model, summary = prepare_model(
        model, device=device, method=cfg.method, lora=cfg.lora, seed=cfg.seed
    )
    assert summary is not None
    prec, _, autocast, scaler = precision_setup(cfg, device)
    run_dir = prepare_run_dir(cfg, info)
    save_config(cfg, run_dir, COMMAND)

    eval_batches = [
        collate([held[i] for i in idx], tok.pad_id) for idx in fixed_batches(held, cfg.eval.batch_size)
    ]
    live, ref_train = _reference(cfg, model, tok.pad_id, run_dir, train_pairs, eval_batches, autocast)
    objective = DPOObjective(cfg.beta, cfg.label_smoothing, live)
    batches = PairSampler(
        train_pairs,
        global_batch=cfg.global_batch,
        micro_batch=cfg.micro_batch,
        pad_id=tok.pad_id,
        ref=ref_train,
        seed=cfg.seed,
    )
    saved = checkpoint_module(model, cfg.method)
    optimizer = build_optimizer(saved, cfg.optim)
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
        objective=objective,
        settings=settings_from(cfg, name="align dpo", unit="pairs"),
        run_dir=run_dir,
        info=info,
        logger=logger,
        evaluator=PreferenceEval(model, objective, eval_batches) if held else None,
        autocast=autocast,
        scaler=scaler,
        extra_state={"config": cfg.model_dump(mode="json"), "precision": prec, "method": cfg.method},
        **trainer_kw,
    )
    trainer.resume_and_say(cfg.resume)
    print(
        f"align dpo ({cfg.method}, beta {cfg.beta}, reference {cfg.reference}): {summary['trainable']:,} of "
        f"{summary['total']:,} parameters trainable ({summary['fraction']:.2%}); {len(train_pairs):,} training "
        f"pairs, {len(held):,} held out; {stats.truncated} truncated to {cfg.max_len} tokens, {stats.identical} "
        f"skipped (chosen = rejected); {prec} on {device}",
        file=sys.stderr,
    )
    try:
        state = trainer.run()
    finally:
        logger.close()
    ckpt = run_dir / "checkpoints" / f"step-{state.model_step:06d}"
    out = export_result(run_dir, ckpt, model, tok, cfg.method, cfg.lora, cfg.model)
    _write_report(cfg, run_dir, state, summary, stats, len(train_pairs), len(held))
    finish_run_dir(run_dir, Path(cfg.output), COMMAND)
    print(f"wrote {cfg.output} ({out.name}/, step {state.step}, {state.tokens:,} pairs)")
    return 0


def _reference(
    cfg: DPOConfig,
    model: nn.Module,
    pad_id: int,
    run_dir: Path,
    train_pairs: list[Pair],
    eval_batches: list[Batch],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> tuple[Reference | None, torch.Tensor | None]:
    """(live reference, precomputed training log-probs): one of the two, as `cfg.reference` says.

    Precomputed: also stores each held-out batch's reference log-probs in it as `ref_logps`."""
    if cfg.reference != "precompute":
        return live_reference(model, cfg.method), None
    scope = reference_scope(model, cfg.method)

    def compute() -> dict[str, torch.Tensor]:
        ref_batches = [
            collate([train_pairs[i] for i in idx], pad_id)
            for idx in fixed_batches(train_pairs, cfg.micro_batch)
        ]
        return {
            "train": compute_reference(model, scope, ref_batches, autocast, "training pairs", cfg.progress),
            "eval": compute_reference(model, scope, eval_batches, autocast, "held-out pairs", cfg.progress),
        }

    ref = stored_reference(run_dir, fingerprint(cfg), compute)
    start = 0
    for b in eval_batches:  # the same batches as evaluation: at step 0 every margin is exactly 0
        m = int(b["count"].numel())
        b["ref_logps"] = torch.cat([ref["eval"][start : start + m, 0], ref["eval"][start : start + m, 1]])
        start += m
    return None, ref["train"]


def _write_report(
    cfg: DPOConfig,
    run_dir: Path,
    state: LoopState,
    summary: dict[str, Any],
    stats: PreferenceStats,
    train_pairs: int,
    held_out: int,
) -> None:
    """report.json: the run's settings, data counts and held-out numbers before and after training."""
    report: dict[str, Any] = {
        "method": cfg.method,
        "beta": cfg.beta,
        "reference": cfg.reference,
        "trainable": summary,
        "data": _stats(stats),
        "train_pairs": train_pairs,
        "held_out_pairs": held_out,
        "steps": state.step,
        "pairs_seen": state.tokens,
    }
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    if evals:
        first, last = evals[0], evals[-1]
        report["before"] = {
            k.removeprefix("val_"): v for k, v in first.items() if k.startswith("val_") or k == "step"
        }
        report["after"] = {
            k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_") or k == "step"
        }
        print(
            f"held-out: reward accuracy {first['val_reward_accuracy']:.1%} -> {last['val_reward_accuracy']:.1%}, "
            f"margin {first['val_reward_margin']:.3f} -> {last['val_reward_margin']:.3f}, loss "
            f"{first['val_loss']:.4f} -> {last['val_loss']:.4f} (step {first['step']} -> {last['step']})"
        )
    atomic_write_json(run_dir / REPORT, report)


def live_reference(model: nn.Module, method: str) -> Reference:
    """Reference log-probs computed every step: adapters off (LoRA) or a frozen copy of the model (full)."""
    if method == "full":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return lambda _, b: sequence_logps(frozen, b["input_ids"], b["labels"])
    scope = reference_scope(model, method)

    def reference(m: nn.Module, b: Batch) -> torch.Tensor:
        with scope():
            return sequence_logps(m, b["input_ids"], b["labels"])

    return reference


__all__ = ["CONFIG", "DPOConfig", "PreferenceEval", "load_policy", "main", "train"]
