"""What every training command shares: the config base, flag splitting, torchrun launch, precision.

    class PretrainConfig(TrainConfig): ...          # a command adds its own keys to the shared ones
    rest, nproc = split_flags(argv)                  # --resume X / --nproc N
    prec, param_dtype, autocast, scaler = precision_setup(cfg, device)

`lmforge pretrain`, `lmforge finetune` and `lmforge align dpo` are leaves built on this module,
train/rundir.py (run directory and final outputs) and train/prepare.py (the one model preparation path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.distributed.run as torchrun
from pydantic import Field, model_validator
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

import lmforge.device as lmdevice
from lmforge.config import ConfigPath, ConfigRef, EncryptionConfig, Section, encryption_field, parse_command
from lmforge.errors import ERROR_DIR_ENV, ConfigError, LmforgeError, first_rank_error
from lmforge.train import distributed as D
from lmforge.train.early_stop import EarlyStoppingConfig
from lmforge.train.optim import OptimConfig
from lmforge.train.schedule import ScheduleConfig


class CheckpointConfig(Section):
    every: int = Field(500, ge=0, description="save every N steps (0 = only at the end); always at the end")
    keep: int = Field(3, ge=0, description="keep the newest K checkpoints (0 = keep all)")


class TrainConfig(Section):
    """The keys every training command has. A command's config derives from this one and adds its data,
    model and evaluation keys; where its default or wording differs it redeclares the field (pydantic keeps
    the field in the base's position). `data` is not here: its type differs per command."""

    output: ConfigPath = Field(
        ..., description="run directory (checkpoints, metrics, final model or adapter)"
    )
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
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpointing")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to train: auto = cuda when present, else cpu; mps = Apple Silicon"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    seed: int = Field(0, description="seeds data order and dropout")
    resume: ConfigRef | None = Field(
        None, description="'auto' (newest checkpoint of this run) or a checkpoint path"
    )
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    nonfinite_rollback: bool = Field(
        True,
        description="undo an update that leaves a weight non-finite (keeps one copy of the trained weights "
        "and optimizer state in memory; false saves it, and such an update then ends the run with exit 4, "
        "the newest checkpoint intact)",
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig,
        description="stop on a validation plateau, keep the best checkpoint",
    )
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    tensorboard: bool = Field(True, description="also log to <output>/tensorboard")
    wandb_project: str | None = Field(
        None, description="also log to this W&B project (needs wandb; WANDB_MODE=offline logs locally)"
    )
    progress: bool = Field(True, description="show a progress bar (or log lines when not a terminal)")
    overwrite: bool = Field(False, description="replace an existing finished output directory")
    encryption: EncryptionConfig = encryption_field()

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        if isinstance(self.micro_batch, int) and self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        return self


def model_config(model: nn.Module) -> Any:
    """The model's config: `cfg` for lmforge models, `config` for HF ones, else None."""
    return getattr(model, "cfg", None) or getattr(model, "config", None)


# -- command line -----------------------------------------------------------------------------------
def split_flags(argv: list[str]) -> tuple[list[str], int | None]:
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
                    nproc = _int_flag(flag, value)
                break
        else:
            out.append(a)
        i += 1
    return out, nproc


def _int_flag(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag}: expected an integer, got {value!r}") from None


def parse_single_process(
    argv: list[str], schema: type[Any], command: str, description: str, example: str
) -> Any:
    """`parse_command` for a command that runs in one process: `--nproc N` with N > 1 is refused."""
    rest, nproc = split_flags(argv)
    if nproc not in (None, 1):
        raise ConfigError(f"--nproc: {command} runs in one process")
    world = D.from_env().world_size
    if world > 1:  # every rank would train the same model into the same output
        raise ConfigError(f"{command} runs in one process; it was launched as {world} (torchrun/accelerate)")
    return parse_command(rest, schema, command, description, example)


def launch_torchrun(command: str, argv: list[str], nproc: int) -> int:
    """Run `lmforge <command> argv` under torchrun with `nproc` processes on this machine.

    This process is torchrun's agent (its own `run`), so a user error that every rank hits is reported once,
    on one line with its exit code, instead of once per rank under torchrun's ChildFailedError dump."""
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "lmforge", command, *argv, "nproc=1"]
    print("launching: torchrun " + " ".join(args), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lmforge-errors-") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # inherited by the ranks
        agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        level = agent_log.level
        agent_log.setLevel(logging.CRITICAL)  # its "failed (exitcode: N)" line would repeat the error
        try:
            torchrun.run(torchrun.parse_args(args))
        except ChildFailedError as e:
            found = first_rank_error(Path(folder))
            if found is None:  # not a user error: the rank printed its own traceback
                rank, failure = min(e.failures.items())
                print(f"error: rank {rank} exited with code {failure.exitcode} (see above)", file=sys.stderr)
                return 1
            message, code = found
            print(f"error: {message}", file=sys.stderr)
            return code
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
            agent_log.setLevel(level)
    return 0


# -- processes and precision ------------------------------------------------------------------------
def on_rank0(info: D.DistInfo, fn: Callable[[], object], what: str) -> None:
    """Run `fn` on rank 0 only; if it raises a user error, every rank stops (none waits for a timeout)."""
    failed, error = 0, None
    if info.is_main:
        try:
            fn()
        except LmforgeError as e:
            failed, error = 1, e
    if D.all_reduce_max(failed):
        raise error or LmforgeError(f"{what} failed on rank 0 (see its message)")


def precision_setup(
    cfg: Any, device: torch.device
) -> tuple[str, torch.dtype | None, Any, torch.amp.GradScaler | None]:
    """(precision, FSDP param dtype, autocast factory, grad scaler) for this device and config.

    `cfg`: any config with `precision` (and `dist`, when it can run FSDP). Under `accelerate launch`, an
    `auto` precision follows the accelerate config's mixed_precision; on MPS it is checked against torch."""
    prec = cfg.precision
    if prec == "auto":
        prec = D.accelerate_precision(os.environ) or "auto"
    if device.type == "mps":
        compiled = bool(getattr(cfg, "compile", False))
        lmdevice.check_training(device, world_size=D.from_env().world_size, compile=compiled)
        prec = lmdevice.mps_precision(prec, lmdevice.facts())
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if prec == "fp32":
        return prec, None, contextlib.nullcontext, None
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    dist_cfg = getattr(cfg, "dist", None)
    if dist_cfg is not None and dist_cfg.strategy == "fsdp" and D.from_env().enabled:
        if prec == "fp16":
            raise ConfigError("precision: fp16 with dist.strategy=fsdp is not supported; use bf16")
        return prec, dtype, contextlib.nullcontext, None  # FSDP's MixedPrecisionPolicy casts instead

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
    return prec, None, autocast, scaler
