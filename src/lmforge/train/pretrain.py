"""`lmforge pretrain`: train a language model on token shards, on a CPU, a GPU or many through torchrun.

    lmforge pretrain -c configs/demo/pretrain.yaml data=runs/demo/tokens output=runs/demo/pretrain
    lmforge pretrain -c cfg.yaml --nproc 2                      # launches torchrun for you
    torchrun --nproc_per_node=8 -m lmforge pretrain -c cfg.yaml dist.strategy=fsdp
    lmforge pretrain -c cfg.yaml --resume auto                  # continue from the newest checkpoint

The run directory gets config.yaml, metrics.jsonl, tensorboard/, checkpoints/step-NNNNNN/ and, at the end,
model/ (the final weights + model config) and manifest.json. While running it lives in `<output>.partial`.
Exit codes: 0 done, 2 bad config or data, 3 integrity check failed, 4 too many non-finite steps,
130 interrupted by SIGTERM/SIGINT after saving a checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import capped, parse_command, save_config
from lmforge.data.manifest import ensure_verified
from lmforge.data.shards import ShardSet
from lmforge.errors import ConfigError, DataError
from lmforge.io import partial_dir
from lmforge.model import source
from lmforge.model.config import flops_per_token
from lmforge.model.hub import pinned
from lmforge.plan.auto import auto_micro_batch, install_oom_backoff
from lmforge.tokenizer import load_tokenizer
from lmforge.train import distributed as D
from lmforge.train.common import (
    launch_torchrun,
    model_config,
    on_rank0,
    precision_setup,
    split_flags,
)
from lmforge.train.configs import PretrainConfig
from lmforge.train.loop import LoopState, Trainer, settings_from
from lmforge.train.metrics import MetricsLogger, peak_flops
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import build_optimizer
from lmforge.train.prepare import prepare_model
from lmforge.train.rundir import export_final, finish_run_dir, prepare_run_dir
from lmforge.train.sampler import BatchSampler, TokenWindows, eval_batches

COMMAND = "pretrain"


CONFIG = PretrainConfig
DESCRIPTION = (
    "Pretrain a causal language model on token shards: AdamW, warmup + cosine/linear/WSD schedule, gradient "
    "accumulation, clipping, mixed precision, periodic validation (loss, perplexity, bits per byte) with "
    "samples, exact resume, DDP/FSDP through torchrun. Exit codes: 0 ok, 2 user error, 3 integrity, "
    "4 too many non-finite steps, 130 interrupted (checkpoint saved)."
)
EXAMPLE = "lmforge pretrain -c configs/demo/pretrain.yaml data=runs/demo/tokens output=runs/demo/pretrain"


# -- model -------------------------------------------------------------------------------------------


def resolve_auto_micro_batch(
    cfg: PretrainConfig, model: nn.Module, device: torch.device, precision: str, info: D.DistInfo
) -> int:
    """micro_batch=auto: the planner's largest micro batch that fits this device (see lmforge.plan.auto)."""
    micro = auto_micro_batch(
        model_config(model),
        seq_len=cfg.seq_len,
        global_batch=cfg.global_batch,
        world=info.world_size,
        device=device,
        precision=precision,
        checkpointing=cfg.activation_checkpointing,
        fsdp=cfg.dist.strategy == "fsdp",
        rollback=cfg.nonfinite_rollback,
    )
    if info.is_main:
        print(f"micro_batch=auto: {micro} (predicted by the planner for {device})", file=sys.stderr)
    return micro


# -- evaluation --------------------------------------------------------------------------------------
class Validation:
    """Validation loss, perplexity and bits per byte on fixed windows, plus a few sampled generations."""

    def __init__(
        self,
        cfg: PretrainConfig,
        batches: list[dict[str, torch.Tensor]],
        tokens_per_byte: float,
        tokenizer: Any,
    ) -> None:
        self.cfg = cfg
        self.batches = batches
        self.tokens_per_byte = tokens_per_byte
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in self.batches:  # every rank runs every batch: FSDP needs all ranks in each forward
            loss_sum, n = causal_lm(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss_sum)
            count += int(n)
        loss = total / max(count, 1)
        out: dict[str, Any] = {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss * self.tokens_per_byte / math.log(2),
            "val_tokens": count,
        }
        if self.tokenizer is not None and self.cfg.eval.sample_tokens > 0:
            out["samples"] = [self._sample(model, p, device, i) for i, p in enumerate(self.cfg.eval.prompts)]
        model.train(was_training)
        return out

    def _sample(self, model: nn.Module, prompt: str, device: torch.device, index: int) -> str:
        e = self.cfg.eval
        gen = torch.Generator().manual_seed(self.cfg.seed + index)  # private: never moves the training RNG
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        x = torch.tensor([ids], device=device)
        for _ in range(e.sample_tokens):
            logits = model(x[:, -self.cfg.seq_len :])[:, -1, :].float().cpu()  # (1, V)
            if e.temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / e.temperature
                if e.top_k:
                    kth = torch.topk(logits, min(e.top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            if int(nxt) == self.tokenizer.eos_id:
                break
            x = torch.cat([x, nxt.to(device)], dim=1)
        return str(self.tokenizer.decode(x[0].tolist()))


# -- entry points ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    rest, nproc_flag = split_flags(argv)
    if nproc_flag is not None:
        rest.append(f"nproc={nproc_flag}")
    cfg = parse_command(rest, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    if cfg.nproc > 1 and not D.launched():
        return launch_torchrun(COMMAND, [a for a in rest if not a.startswith("nproc=")], cfg.nproc)
    return train(cfg)


def train(cfg: PretrainConfig, **trainer_kw: Any) -> int:
    """Run the configured training in this process (one rank of a torchrun job, or alone)."""
    info = D.from_env()
    _check_world(cfg, info)
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})  # a hub id's commit, saved in config.yaml
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    D.init(info, device, cfg.dist.timeout_s)
    try:
        _run(_capped_seq_len(cfg, info), info, device, trainer_kw)
        D.barrier()
        return 0
    finally:
        D.shutdown()


def _check_world(cfg: PretrainConfig, info: D.DistInfo) -> None:
    """The global batch splits evenly over the processes (and their micro batches)."""
    if info.enabled and cfg.global_batch % info.world_size:
        raise ConfigError(
            f"global_batch ({cfg.global_batch}) must be a multiple of {info.world_size} processes"
        )
    if (
        info.enabled
        and isinstance(cfg.micro_batch, int)
        and cfg.global_batch % (cfg.micro_batch * info.world_size)
    ):
        raise ConfigError(
            f"global_batch ({cfg.global_batch}) must be a multiple of micro_batch x processes "
            f"({cfg.micro_batch} x {info.world_size})"
        )


def _capped_seq_len(cfg: PretrainConfig, info: D.DistInfo) -> PretrainConfig:
    """Continued pretraining: seq_len capped (with a notice) at the folder's context. A preset or model YAML is
    sized to seq_len instead."""
    if not Path(cfg.model).is_dir():
        return cfg
    limit = source.model_config(cfg.model).max_seq_len
    seq_len = capped("seq_len", cfg.seq_len, limit, f"the context of {cfg.model}", say=info.is_main)
    return cfg.model_copy(update={"seq_len": seq_len})


def _run(cfg: PretrainConfig, info: D.DistInfo, device: torch.device, trainer_kw: dict[str, Any]) -> None:
    train_set, val_set, windows, val_windows = _load_data(cfg, info)
    model = source.pretrain_model(
        cfg.model,
        vocab_size=train_set.vocab_size,
        seq_len=cfg.seq_len,
        overrides=cfg.model_overrides,
        device=device,
        seed=cfg.seed,
    )
    prec, param_dtype, autocast, scaler = precision_setup(cfg, device)
    auto_micro = cfg.micro_batch == "auto"
    if auto_micro:
        cfg = cfg.model_copy(update={"micro_batch": resolve_auto_micro_batch(cfg, model, device, prec, info)})
    assert isinstance(cfg.micro_batch, int)
    sampler = BatchSampler(
        windows,
        global_batch=cfg.global_batch,
        micro_batch=cfg.micro_batch,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
    )
    train_model, _ = prepare_model(
        model,
        device=device,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
        dist=cfg.dist,
        info=info,
        param_dtype=param_dtype,
    )
    optimizer = build_optimizer(model, cfg.optim)

    run_dir = partial_dir(Path(cfg.output))
    on_rank0(info, lambda: prepare_run_dir(cfg, info), "output directory")
    if info.is_main:
        save_config(cfg, run_dir, COMMAND)
    logger = MetricsLogger(
        run_dir,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
        wandb_project=cfg.wandb_project,
        config=cfg.model_dump(mode="json"),
    )
    validation = _validation(cfg, train_set, val_set, val_windows)
    fpt = _flops_per_token(model, cfg.seq_len)
    trainer = Trainer(
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        batches=sampler,
        objective=causal_lm,
        settings=settings_from(cfg, flops_per_token=fpt, peak_flops=peak_flops(device)),
        run_dir=run_dir,
        info=info,
        logger=logger,
        evaluator=validation,
        autocast=autocast,
        scaler=scaler,
        extra_state={"config": cfg.model_dump(mode="json"), "precision": prec},
        **trainer_kw,
    )
    if auto_micro:
        install_oom_backoff(trainer, sampler)
    trainer.resume_and_say(cfg.resume)
    if info.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(
            f"pretrain: {n / 1e6:.2f}M parameters, {train_set.num_tokens:,} train tokens, "
            f"{sampler.accum_steps} accumulation x {cfg.micro_batch} x {info.world_size} processes, "
            f"{prec} on {device}",
            file=sys.stderr,
        )
    try:
        state = trainer.run()
    finally:
        logger.close()
    if info.is_main:
        _finish(cfg, run_dir, state, model, train_set)


def _load_data(
    cfg: PretrainConfig, info: D.DistInfo
) -> tuple[ShardSet, ShardSet, TokenWindows, TokenWindows]:
    """(train shards, validation shards, their windows); only rank 0 hashes the input against its manifest,
    the others learn the verdict from a collective."""
    on_rank0(info, lambda: ensure_verified(Path(cfg.data), skip=not cfg.verify_input), "input check")
    train_set = ShardSet(cfg.data, "train", verify=False)
    val_set = ShardSet(cfg.data, "val", verify=False)
    windows = TokenWindows(train_set.arrays, cfg.seq_len)
    if windows.num_windows < 1:
        raise DataError(f"{cfg.data}: {train_set.num_tokens} training tokens, fewer than seq_len+1")
    val_windows = TokenWindows(val_set.arrays, cfg.seq_len)
    if val_windows.num_windows < 1:
        raise DataError(f"{cfg.data}: validation split has fewer than seq_len+1 = {cfg.seq_len + 1} tokens")
    return train_set, val_set, windows, val_windows


def _validation(
    cfg: PretrainConfig, train_set: ShardSet, val_set: ShardSet, val_windows: TokenWindows
) -> Validation:
    tokenizer = None
    if cfg.eval.sample_tokens > 0 and train_set.tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(train_set.tokenizer_dir)
    return Validation(
        cfg,
        eval_batches(val_windows, cfg.eval.batches, cfg.eval.batch_size),
        val_set.num_tokens / max(val_set.num_bytes, 1),
        tokenizer,
    )


def _flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token for MFU (0 when the model has no lmforge config to count from)."""
    mcfg = model_config(model)
    return 0.0 if mcfg is None else float(flops_per_token(mcfg, seq_len))


def _finish(
    cfg: PretrainConfig, run_dir: Path, state: LoopState, model: nn.Module, train_set: ShardSet
) -> None:
    """Rank 0: export model/, print the validation summary and publish the run directory."""
    export_final(
        run_dir, run_dir / "checkpoints" / f"step-{state.model_step:06d}", model, train_set.tokenizer_dir
    )
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    if evals:
        first, last = evals[0], evals[-1]
        for text in last.get("samples", []):
            print(f"sample: {text!r}")
        print(
            f"validation: loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.2f}, "
            f"bits per byte {last['val_bpb']:.4f} (step {first['step']}: {first['val_bpb']:.4f})"
        )
    finish_run_dir(run_dir, Path(cfg.output), COMMAND)
    print(f"wrote {cfg.output} (step {state.step}, {state.tokens:,} tokens, {state.bad_steps} skipped)")
