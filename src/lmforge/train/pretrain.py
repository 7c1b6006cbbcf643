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

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmforge.config import Section, parse_command, save_config
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.io import atomic_write_json, partial_dir
from lmforge.model.source import pretrain_model
from lmforge.train import distributed as D
from lmforge.train.distributed import DistConfig
from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig

COMMAND = "pretrain"


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


class CheckpointConfig(Section):
    every: int = Field(500, ge=0, description="save every N steps (0 = only at the end); always at the end")
    keep: int = Field(3, ge=0, description="keep the newest K checkpoints (0 = keep all)")


class PretrainConfig(Section):
    data: str = Field(..., description="tokens directory written by `lmforge tokenize`")
    output: str = Field(..., description="run directory (checkpoints, metrics, final model)")
    model: str = Field(
        "tiny", description="a preset name (tiny, small, gpt2-124m, ...), a model YAML, or an HF folder"
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
    checkpoint: CheckpointConfig = CheckpointConfig()
    dist: DistConfig = DistConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU"
    )
    activation_checkpointing: bool = Field(False, description="recompute each block in backward")
    compile: bool = Field(False, description="torch.compile the model (slow first step)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per process (null = torch default)"
    )
    seed: int = Field(0, description="seeds weights, data order and dropout")
    resume: str | None = Field(
        None, description="'auto' (newest checkpoint of this run) or a checkpoint path"
    )
    nproc: int = Field(1, ge=1, description="processes on this machine; >1 launches torchrun")
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    tensorboard: bool = Field(True, description="also log to <output>/tensorboard")
    wandb_project: str | None = Field(None, description="log to this W&B project (needs wandb installed)")
    progress: bool = Field(True, description="show a progress bar (or log lines when not a terminal)")
    verify_input: bool = Field(True, description="check the tokens directory against its manifest")
    overwrite: bool = Field(False, description="replace an existing finished output directory")

    @model_validator(mode="after")
    def _divisible(self) -> PretrainConfig:
        if isinstance(self.micro_batch, int) and self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        return self


CONFIG = PretrainConfig
DESCRIPTION = (
    "Pretrain a causal language model on token shards: AdamW, warmup + cosine/linear/WSD schedule, gradient "
    "accumulation, clipping, mixed precision, periodic validation (loss, perplexity, bits per byte) with "
    "samples, exact resume, DDP/FSDP through torchrun. Exit codes: 0 ok, 2 user error, 3 integrity, "
    "4 too many non-finite steps, 130 interrupted (checkpoint saved)."
)
EXAMPLE = "lmforge pretrain -c configs/demo/pretrain.yaml data=runs/demo/tokens output=runs/demo/pretrain"


# -- model -------------------------------------------------------------------------------------------
def model_config(model: nn.Module) -> Any:
    return getattr(model, "cfg", None) or getattr(model, "config", None)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block of `model.layers` in backward; parameter names stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("activation_checkpointing: the model has no `layers` list of blocks to wrap")
    for block in layers:
        forward = block.forward

        def checkpointed(*args: Any, _f: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        setattr(block, "forward", checkpointed)  # noqa: B010 - an instance attribute shadows the method


def resolve_auto_micro_batch(
    cfg: PretrainConfig, model: nn.Module, device: torch.device, precision: str, info: D.DistInfo
) -> int:
    """micro_batch=auto: the planner's largest micro batch that fits this device (see lmforge.plan.auto)."""
    from lmforge.plan.auto import auto_micro_batch

    micro = auto_micro_batch(
        model_config(model),
        seq_len=cfg.seq_len,
        global_batch=cfg.global_batch,
        world=info.world_size,
        device=device,
        precision=precision,
        checkpointing=cfg.activation_checkpointing,
        fsdp=cfg.dist.strategy == "fsdp",
    )
    if info.is_main:
        print(f"micro_batch=auto: {micro} (predicted by the planner for {device})", file=sys.stderr)
    return micro


def precision_setup(
    cfg: Any, device: torch.device
) -> tuple[str, torch.dtype | None, Any, torch.amp.GradScaler | None]:
    """(precision, FSDP param dtype, autocast factory, grad scaler) for this device and config.

    `cfg`: any config with `precision` (and `dist`, when it can run FSDP); fine-tuning shares this."""
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if prec == "fp32":
        return prec, None, contextlib.nullcontext, None
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    dist_cfg = getattr(cfg, "dist", None)
    if dist_cfg is not None and dist_cfg.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if prec == "fp16":
            raise ConfigError("precision: fp16 with dist.strategy=fsdp is not supported; use bf16")
        return prec, dtype, contextlib.nullcontext, None  # FSDP's MixedPrecisionPolicy casts instead

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
    return prec, None, autocast, scaler


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
        from lmforge.train.objectives import causal_lm

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


# -- run directory -----------------------------------------------------------------------------------
def prepare_run_dir(cfg: Any, info: D.DistInfo) -> Path:
    """The directory this run writes to (`<output>.partial` until the end); rank 0 creates it.

    `cfg`: any config with `output`, `resume` and `overwrite` (fine-tuning and alignment share this)."""
    final = Path(cfg.output)
    stage = partial_dir(final)
    if info.is_main:
        if cfg.resume is not None and final.exists() and not stage.exists():
            os.replace(final, stage)  # train a finished run further: reopen it
        elif final.exists() and not cfg.overwrite and cfg.resume is None:
            raise LmforgeError(f"{final} already exists; pass overwrite=true to replace it or --resume auto")
        if stage.exists() and cfg.resume is None:
            if (
                (stage / "checkpoints").is_dir()
                and any((stage / "checkpoints").iterdir())
                and not cfg.overwrite
            ):
                raise LmforgeError(
                    f"{stage} holds checkpoints of an unfinished run; continue it with --resume auto "
                    "or start over with overwrite=true"
                )
            shutil.rmtree(stage)
        stage.mkdir(parents=True, exist_ok=True)
    return stage


def finish_run_dir(stage: Path, final: Path, command: str = COMMAND) -> None:
    """Write the manifest and rename `<output>.partial` to `<output>` (every training command ends so)."""
    from lmforge.data.manifest import write_manifest
    from lmforge.io import publish_dir

    write_manifest(stage, stage=command)
    publish_dir(stage, final)


def export_final(run_dir: Path, ckpt: Path, model: nn.Module, tokenizer_dir: Path | None) -> None:
    """`model/`: the final weights (a copy of the last checkpoint's), the model config as JSON and the
    tokenizer files, so the folder alone is enough for `generate`, `eval` and `serve`."""
    out = run_dir / "model"
    out.mkdir(exist_ok=True)
    shutil.copyfile(ckpt / "model.safetensors", out / "model.safetensors")
    mcfg = model_config(model)
    if mcfg is not None and hasattr(mcfg, "model_dump"):
        atomic_write_json(out / "model_config.json", mcfg.model_dump(mode="json"))
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)


def _on_rank0(info: D.DistInfo, fn: Callable[[], object], what: str) -> None:
    """Run `fn` on rank 0 only; if it raises a user error, every rank stops (none waits for a timeout)."""
    failed, error = 0, None
    if info.is_main:
        try:
            fn()
        except LmforgeError as e:
            failed, error = 1, e
    if D.all_reduce_max(failed):
        raise error or LmforgeError(f"{what} failed on rank 0 (see its message)")


# -- entry points ------------------------------------------------------------------------------------
def _split_flags(argv: list[str]) -> tuple[list[str], int | None]:
    """`--resume X` / `--resume=X` become the override resume=X; `--nproc N` is returned separately."""
    out: list[str] = []
    nproc: int | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        for flag in ("--resume", "--nproc"):
            if a == flag or a.startswith(flag + "="):
                if "=" in a:
                    value = a.split("=", 1)[1]
                else:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"{flag}: expected a value")
                    i += 1
                    value = argv[i]
                if flag == "--resume":
                    out.append(f"resume={value}")
                else:
                    try:
                        nproc = int(value)
                    except ValueError:
                        raise ConfigError(f"--nproc: expected an integer, got {value!r}") from None
                break
        else:
            out.append(a)
        i += 1
    return out, nproc


def launch_torchrun(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmforge",
        COMMAND,
        *argv,
        "nproc=1",
    ]
    print("launching: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def main(argv: list[str]) -> int:
    rest, nproc_flag = _split_flags(argv)
    if nproc_flag is not None:
        rest.append(f"nproc={nproc_flag}")
    cfg = parse_command(rest, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun([a for a in rest if not a.startswith("nproc=")], cfg.nproc)
    return train(cfg)


def train(cfg: PretrainConfig, **trainer_kw: Any) -> int:
    """Run the configured training in this process (one rank of a torchrun job, or alone)."""
    from lmforge.data.manifest import ensure_verified
    from lmforge.data.shards import ShardSet
    from lmforge.train.loop import Trainer, settings_from
    from lmforge.train.metrics import MetricsLogger, peak_flops
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import build_optimizer
    from lmforge.train.sampler import BatchSampler, TokenWindows, eval_batches

    info = D.from_env()
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    D.init(info, device, cfg.dist.timeout_s)
    try:
        # Only rank 0 hashes the input; the others learn the verdict from a collective.
        _on_rank0(info, lambda: ensure_verified(Path(cfg.data), skip=not cfg.verify_input), "input check")
        train_set = ShardSet(cfg.data, "train", verify=False)
        val_set = ShardSet(cfg.data, "val", verify=False)
        windows = TokenWindows(train_set.arrays, cfg.seq_len)
        if windows.num_windows < 1:
            raise DataError(f"{cfg.data}: {train_set.num_tokens} training tokens, fewer than seq_len+1")
        val_windows = TokenWindows(val_set.arrays, cfg.seq_len)
        if val_windows.num_windows < 1:
            raise DataError(
                f"{cfg.data}: validation split has fewer than seq_len+1 = {cfg.seq_len + 1} tokens"
            )
        model = pretrain_model(
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
            cfg = cfg.model_copy(
                update={"micro_batch": resolve_auto_micro_batch(cfg, model, device, prec, info)}
            )
        assert isinstance(cfg.micro_batch, int)
        sampler = BatchSampler(
            windows,
            global_batch=cfg.global_batch,
            micro_batch=cfg.micro_batch,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.seed,
        )
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.compile:
            model.compile()
        train_model = D.wrap(model, cfg.dist, info, device, param_dtype)
        optimizer = build_optimizer(model, cfg.optim)

        run_dir = partial_dir(Path(cfg.output))
        _on_rank0(info, lambda: prepare_run_dir(cfg, info), "output directory")
        if info.is_main:
            save_config(cfg, run_dir, COMMAND)
        logger = MetricsLogger(
            run_dir,
            enabled=info.is_main,
            tensorboard=cfg.tensorboard,
            wandb_project=cfg.wandb_project,
            config=cfg.model_dump(mode="json"),
        )
        tokenizer = None
        if cfg.eval.sample_tokens > 0 and train_set.tokenizer_dir.is_dir():
            from lmforge.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(train_set.tokenizer_dir)
        validation = Validation(
            cfg,
            eval_batches(val_windows, cfg.eval.batches, cfg.eval.batch_size),
            val_set.num_tokens / max(val_set.num_bytes, 1),
            tokenizer,
        )
        fpt = 0.0
        mcfg = model_config(model)
        if mcfg is not None:
            from lmforge.model.config import flops_per_token

            fpt = float(flops_per_token(mcfg, cfg.seq_len))
        settings = settings_from(cfg, flops_per_token=fpt, peak_flops=peak_flops(device))
        trainer = Trainer(
            model=model,
            train_model=train_model,
            optimizer=optimizer,
            batches=sampler,
            objective=causal_lm,
            settings=settings,
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
            from lmforge.plan.auto import install_oom_backoff

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
        last = Path(run_dir) / "checkpoints" / f"step-{state.step:06d}"
        if info.is_main:
            export_final(run_dir, last, model, train_set.tokenizer_dir)
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
            finish_run_dir(run_dir, Path(cfg.output))
            print(
                f"wrote {cfg.output} (step {state.step}, {state.tokens:,} tokens, {state.bad_steps} skipped)"
            )
        D.barrier()
        return 0
    finally:
        D.shutdown()
