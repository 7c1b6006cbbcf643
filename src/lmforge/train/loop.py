"""The one training loop: accumulate, normalise per token, clip, skip non-finite steps, log, evaluate, save.

Pretraining, fine-tuning and preference training share it and differ only in the objective (a function
`(model, batch) -> (loss_sum, n_tokens)`, see objectives.py) and in where batches come from (anything with
`micro_batches(step) -> list[batch]` and `state(step)`, see sampler.py).

Per optimizer step `s`:
    lr     = peak_lr * schedule(s)
    ranks' micro batches of global batch s -> target-token count N, summed over micro batches and ranks
    each micro batch: backward(loss_sum * world / N)     # DDP/FSDP average over ranks: = sum / N overall
    clip the global grad norm; if the loss or the norm is not finite, skip the update (weights and
    optimizer state untouched), count it, and stop after `max_bad_steps` in a row (exit code 4)
    after the update, one reduction checks every weight: a step that left one non-finite is rolled
    back to the copy taken before it (weights and optimizer state) and counted the same way
A SIGTERM/SIGINT stops the loop after the current micro batch; if that is mid-accumulation the partial
gradients are dropped and the checkpoint records the RNG state from the start of the step, so the resumed
run recomputes step s exactly (exit code 130).
With early stopping (early_stop.py) each evaluation may save the new best checkpoint, and the run ends
before `total_steps` once the watched metric has not improved for `patience` evaluations.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.model.integrity import latest_checkpoint
from lmforge.progress import clock, eta
from lmforge.train import distributed as D
from lmforge.train.checkpoint import (
    load_checkpoint,
    remove_stale,
    restore_weights,
    rng_state,
    save_checkpoint,
)
from lmforge.train.early_stop import BestTracker, EarlyStoppingConfig
from lmforge.train.metrics import MetricsLogger, device_metrics
from lmforge.train.objectives import Batch, Objective, count_targets
from lmforge.train.schedule import ScheduleConfig, lr_multiplier

EXIT_NONFINITE = 4
EXIT_INTERRUPTED = 130


class NonFiniteError(LmforgeError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm."""

    exit_code = EXIT_NONFINITE


class Interrupted(LmforgeError):
    """SIGTERM/SIGINT: a checkpoint was saved, the run can be resumed with --resume auto."""

    exit_code = EXIT_INTERRUPTED


class BatchSource(Protocol):
    def micro_batches(self, step: int) -> list[Batch]: ...

    def state(self, step: int) -> dict[str, int]: ...


@dataclass
class LoopSettings:
    total_steps: int
    lr: float
    schedule: ScheduleConfig
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_at_start: bool = False  # also evaluate the untrained model (step 0), for a before/after
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    # Roll back an update that leaves a weight non-finite. Costs one more copy of the trainable weights
    # and optimizer state in device memory (see StepUndo); False skips the copy, and a non-finite weight
    # then stops the run (NonFiniteError) before anything is saved.
    undo_nonfinite: bool = True
    flops_per_token: float = 0.0  # training FLOPs per token (6N + attention), for MFU
    peak_flops: float | None = None  # of one device; None = no MFU
    progress: bool = True
    name: str = "pretrain"  # progress bar label
    unit: str = "tok"  # what `count_targets` counts, for the rate shown (DPO: pairs)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def settings_from(cfg: Any, **extra: Any) -> LoopSettings:
    """LoopSettings from a training command's config (pretrain, finetune and align dpo share these keys:
    max_steps, optim, schedule, log_every, eval.every, checkpoint.every/keep, max_bad_steps, progress,
    early_stopping)."""
    return LoopSettings(
        total_steps=cfg.max_steps,
        lr=cfg.optim.lr,
        schedule=cfg.schedule,
        grad_clip=cfg.optim.grad_clip,
        log_every=cfg.log_every,
        eval_every=cfg.eval.every,
        eval_at_start=True,
        checkpoint_every=cfg.checkpoint.every,
        keep_checkpoints=cfg.checkpoint.keep,
        max_bad_steps=cfg.max_bad_steps,
        undo_nonfinite=cfg.nonfinite_rollback,
        progress=cfg.progress,
        early_stopping=cfg.early_stopping,
        **extra,
    )


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done = index of the next global batch
    tokens: int = 0  # target tokens trained on, all ranks
    bad_steps: int = 0
    consecutive_bad: int = 0
    losses: list[float] = field(default_factory=list)  # this process's steps only, for tests and summaries
    stopped_early: bool = False
    model_step: int = 0  # the checkpoint whose weights the run's result holds (last, or best if restored)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return cast(torch.Tensor, to_local()) if to_local is not None else t


class StepUndo:
    """A copy of the trainable weights and the optimizer state, taken before each update, so an update
    that leaves a weight non-finite can be undone exactly. Buffers are allocated once and reused (the
    cost: one more copy of the parameters and optimizer state in device memory, and a copy per step)."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer
        self._weights: list[torch.Tensor] = []
        self._state: dict[int, dict[str, Any]] = {}
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def take(self) -> None:
        local = [_local(p.detach()) for p in self.params]
        if not self._weights:
            self._weights = [torch.empty_like(t) for t in local]
        torch._foreach_copy_(self._weights, local)
        self._state = {
            i: self._copy(i, "", self.optimizer.state[p])
            for i, p in enumerate(self.params)
            if p in self.optimizer.state
        }

    def _copy(self, i: int, prefix: str, entry: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                local = _local(value)
                buf = self._buffers.get((i, prefix + key))
                if buf is None or buf.shape != local.shape or buf.dtype != local.dtype:
                    buf = self._buffers[(i, prefix + key)] = torch.empty_like(local)
                out[key] = buf.copy_(local)
            elif isinstance(value, dict):
                out[key] = self._copy(i, f"{prefix}{key}/", value)
            else:
                out[key] = value
        return out

    def finite(self) -> bool:
        """Whether every weight is finite on every rank: one max-norm reduction, one sync."""
        norms = torch._foreach_norm([_local(p.detach()) for p in self.params], ord=math.inf)
        local_ok = bool(torch.stack(norms).isfinite().all()) if norms else True
        return not D.all_reduce_max(int(not local_ok))

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_([_local(p.detach()) for p in self.params], self._weights)
        for i, p in enumerate(self.params):
            if i in self._state:
                self.optimizer.state[p] = _restored(self.optimizer.state[p], self._state[i])
            else:  # the update created this parameter's state: back to none
                self.optimizer.state.pop(p, None)


def _restored(live: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` written back into the live state's own tensors (DTensors keep their sharding)."""
    out: dict[str, Any] = {}
    for key, value in saved.items():
        cur = live.get(key)
        if isinstance(value, torch.Tensor) and isinstance(cur, torch.Tensor):
            _local(cur).copy_(value)
            out[key] = cur
        elif isinstance(value, dict):
            out[key] = _restored(cur if isinstance(cur, dict) else {}, value)
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


class Evaluator(Protocol):
    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]: ...


@contextlib.contextmanager
def stop_signals(flag: list[bool]) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into a flag the loop polls (only possible in the main thread)."""

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    """Holds what a run trains; `run()` goes from `state.step` to `settings.total_steps`."""

    def __init__(
        self,
        *,
        model: nn.Module,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: BatchSource,
        objective: Objective,
        settings: LoopSettings,
        run_dir: Path,
        info: D.DistInfo = D.DistInfo(),
        logger: MetricsLogger | None = None,
        evaluator: Evaluator | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        extra_state: dict[str, Any] | None = None,
        should_stop: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.model = model  # unwrapped (or FSDP-sharded in place): what checkpoints read and write
        self.train_model = train_model  # what the forward pass runs through (DDP wrapper or the model)
        self.optimizer = optimizer
        self.batches = batches
        self.objective = objective
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.info = info
        self.logger = logger
        self.evaluator = evaluator
        self.autocast = autocast
        self.scaler = scaler
        self.extra_state = extra_state or {}
        self.should_stop = should_stop  # (step, micro) -> bool; tests use it to stop at an exact point
        self.state = LoopState()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.undo = StepUndo(self.params, optimizer)
        es = settings.early_stopping
        self.best = BestTracker(es) if es.active else None
        if self.best is not None and evaluator is None:
            raise ConfigError(
                "early_stopping: needs validation data to watch (this run has no evaluation set)"
            )
        self._signal = [False]
        # The architecture saved with each checkpoint: the model's own config, or for a LoRA run (whose
        # checkpoint module is a view of the adapters) the config of the model it trains.
        inner = getattr(train_model, "module", train_model)  # DDP wraps the model
        self.model_config = getattr(model, "cfg", None) or getattr(inner, "cfg", None)

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, rng: dict[str, Any] | None = None) -> Path:
        s = self.state
        state = {
            "tokens": s.tokens,
            "bad_steps": s.bad_steps,
            "consecutive_bad": s.consecutive_bad,
            "sampler": self.batches.state(s.step),
            "schedule": {
                "total_steps": self.settings.total_steps,
                "lr_multiplier": lr_multiplier(s.step, self.settings.total_steps, self.settings.schedule),
                **self.settings.schedule.model_dump(),
            },
            "world_size": self.info.world_size,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            **self.extra_state,
        }
        if self.best is not None:
            state["early_stopping"] = self.best.state()
        return save_checkpoint(
            self.checkpoint_root,
            s.step,
            self.model,
            self.optimizer,
            state,
            rank=self.info.rank,
            keep=self.settings.keep_checkpoints,
            rng=rng,
            barrier=D.barrier,
            model_config=self.model_config if isinstance(self.model_config, BaseModel) else None,
            protect=self.best.best_step if self.best is not None else None,
        )

    def resume(self, path: Path | str) -> Path | None:
        """Load `path` ('auto' = the newest complete checkpoint of this run, if any)."""
        if self.info.is_main:
            remove_stale(self.checkpoint_root)
        if str(path) == "auto":
            found = latest_checkpoint(self.checkpoint_root)
            if found is None:
                return None
            path = found
        state = load_checkpoint(Path(path), self.model, self.optimizer, rank=self.info.rank)
        saved, now = state.get("sampler") or {}, self.batches.state(int(state["step"]))
        changed = [f"{k}={saved[k]} (now {now[k]})" for k in saved.keys() & now.keys() if saved[k] != now[k]]
        if changed:  # the data order is a function of these: resuming would not continue the same run
            raise ConfigError(
                f"{path}: written with {', '.join(sorted(changed))}; resume with the same values"
            )
        self.state.step = int(state["step"])
        self.state.tokens = int(state["tokens"])
        self.state.bad_steps = int(state["bad_steps"])
        self.state.consecutive_bad = int(state["consecutive_bad"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.best is not None:
            self.best.load(state.get("early_stopping"))
        return Path(path)

    def resume_and_say(self, resume: str | None) -> None:
        """`resume` of a command's config (None, 'auto' or a path): load it and say where training starts."""
        if resume is None:
            return
        loaded = self.resume(resume)
        if self.info.is_main:
            print(
                f"resumed from {loaded} at step {self.state.step}"
                if loaded is not None
                else "resume=auto: no checkpoint yet, starting from step 0",
                file=sys.stderr,
            )

    # -- one step ------------------------------------------------------------------------------------
    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce on all but the last micro batch of an accumulation cycle."""
        no_sync = getattr(self.train_model, "no_sync", None)  # DDP
        if no_sync is not None and not last:
            return cast(contextlib.AbstractContextManager[Any], no_sync())
        set_sync = getattr(self.train_model, "set_requires_gradient_sync", None)  # FSDP2
        if set_sync is not None:
            set_sync(last)
        return contextlib.nullcontext()

    def _stop_requested(self, step: int, micro: int) -> bool:
        local = self._signal[0] or (self.should_stop is not None and self.should_stop(step, micro))
        return bool(D.all_reduce_max(int(local)))

    def _grad_norm(self) -> torch.Tensor:
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, error_if_nonfinite=False, foreach=True)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return (full() if full is not None else norm).detach().float().cpu()

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; None when a stop was requested (the state is then at the step's start)."""
        s, st = self.state, self.settings
        step_rng = rng_state()
        lr = st.lr * lr_multiplier(s.step, st.total_steps, st.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self.batches.micro_batches(s.step)
        device = self.params[0].device
        counts = torch.tensor([float(sum(count_targets(b) for b in micro))])
        n_global = float(D.all_reduce_sum(counts).item())
        assert n_global > 0, "a global batch with no target tokens"
        scale = self.info.world_size / n_global
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with self._sync_context(m == len(micro) - 1), self.autocast():
                part, _ = self.objective(self.train_model, batch)
                scaled = part * scale
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += part.detach().double().cpu()
            if self._stop_requested(s.step, m):
                self.optimizer.zero_grad(set_to_none=True)
                self.save(rng=step_rng)
                return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self._grad_norm()
        loss = float(D.all_reduce_sum(loss_sum).item()) / n_global
        loss_ok = math.isfinite(loss)
        norm_ok = bool(torch.isfinite(norm))
        if self.scaler is not None:
            self._take_undo()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
            bad = not loss_ok  # gradient overflow is routine with fp16 loss scaling
            bad = self._undo_if_nonfinite() or bad
        elif loss_ok and norm_ok:
            self._take_undo()
            self.optimizer.step()
            bad = self._undo_if_nonfinite()
        else:
            bad = True
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens += int(n_global)
        s.losses.append(loss)
        if bad:
            s.bad_steps += 1
            s.consecutive_bad += 1
            if self.logger is not None:
                self.logger.log("event", s.step, {"message": "non-finite step skipped", "loss": str(loss)})
        else:
            s.consecutive_bad = 0
        return {"loss": loss, "grad_norm": float(norm), "lr": lr, "tokens": n_global, "skipped": bad}

    def _take_undo(self) -> None:
        if self.settings.undo_nonfinite:
            self.undo.take()

    def _undo_if_nonfinite(self) -> bool:
        """Roll back an update that left a weight non-finite (e.g. a huge step overflowing); True if so.
        Without the copy the weights cannot be restored: stop before a checkpoint could save them."""
        if self.undo.finite():
            return False
        if not self.settings.undo_nonfinite:
            raise NonFiniteError(
                f"step {self.state.step + 1}: the update left a weight non-finite and nonfinite_rollback is "
                "off; resume from the newest checkpoint (--resume auto) with a lower learning rate"
            )
        self.undo.restore()
        return True

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> LoopState:
        s, st = self.state, self.settings
        with stop_signals(self._signal), self._progress() as bar:
            task = bar.add_task(st.name, total=st.total_steps, completed=s.step, loss="-", rate="-", mfu="")
            start_step, started = s.step, time.perf_counter()  # for the ETA of the log lines (wall time)
            if self.evaluator is not None and st.eval_at_start and s.step == 0:
                results = self.evaluator(self.model, 0)
                if self.logger is not None:
                    self.logger.log("eval", 0, results)
            busy, tok0 = 0.0, s.tokens  # training seconds since the last log (eval and saves excluded)
            device = self.params[0].device
            s.stopped_early = self.best is not None and self.best.exhausted  # resumed a stopped run
            saved_at = -1
            while s.step < st.total_steps and not s.stopped_early:
                t0 = time.perf_counter()
                out = self.train_step()
                busy += time.perf_counter() - t0
                if out is None:
                    raise Interrupted(
                        f"stopped by signal at step {s.step}; checkpoint saved in {self.checkpoint_root}, "
                        "continue with --resume auto"
                    )
                if s.consecutive_bad >= st.max_bad_steps:
                    raise NonFiniteError(
                        f"{s.consecutive_bad} consecutive steps with a non-finite loss or gradient norm "
                        f"(last at step {s.step}); lower optim.lr, check the data, or raise max_bad_steps"
                    )
                if s.step % st.log_every == 0 or s.step == st.total_steps:
                    rate = (s.tokens - tok0) / max(busy, 1e-9)
                    values = {**out, "tokens_per_s": rate, "tokens_seen": s.tokens, "bad_steps": s.bad_steps}
                    values.update(device_metrics(device))
                    pop_metrics = getattr(self.objective, "pop_metrics", None)  # e.g. DPO reward statistics
                    if pop_metrics is not None:
                        values.update(pop_metrics())
                    mfu = ""
                    if st.peak_flops and st.flops_per_token:
                        values["mfu"] = rate * st.flops_per_token / (st.peak_flops * self.info.world_size)
                        mfu = f"MFU {values['mfu']:.1%}"
                    if self.logger is not None:
                        self.logger.log("train", s.step, values)
                    bar.update(
                        task, completed=s.step, loss=f"{out['loss']:.4f}", rate=f"{rate:,.0f}", mfu=mfu
                    )
                    if not bar.live.is_started and self.info.is_main and st.progress:
                        steps_per_s = (s.step - start_step) / max(time.perf_counter() - started, 1e-9)
                        left = clock(eta(s.step, st.total_steps, steps_per_s))
                        print(
                            f"step {s.step}/{st.total_steps} loss {out['loss']:.4f} {rate:,.0f} {st.unit}/s "
                            f"eta {left} {mfu}".rstrip(),
                            flush=True,
                        )
                    busy, tok0 = 0.0, s.tokens
                if self.evaluator is not None and (
                    (st.eval_every and s.step % st.eval_every == 0) or s.step == st.total_steps
                ):
                    saved_at = s.step if self._evaluate() else saved_at
                if (
                    st.checkpoint_every
                    and s.step % st.checkpoint_every == 0
                    and s.step < st.total_steps
                    and saved_at != s.step
                ):
                    self.save()
                    saved_at = s.step
            if s.stopped_early:
                self._say_stopped()
            if saved_at != s.step:
                self.save()
        self._restore_best()
        return s

    def _evaluate(self) -> bool:
        """Evaluate at this step and update early stopping; True when it saved the new best checkpoint."""
        assert self.evaluator is not None
        s = self.state
        results = self.evaluator(self.model, s.step)
        if self.logger is not None:
            self.logger.log("eval", s.step, results)
        if self.best is None:
            return False
        improved = self.best.update(s.step, results)
        if improved:
            self.save()  # the new best: kept through pruning
        s.stopped_early = self.best.exhausted
        return improved

    def _restore_best(self) -> None:
        """Set `model_step`; with restore_best, load the best checkpoint's weights into the model."""
        s, es = self.state, self.settings.early_stopping
        s.model_step = s.step
        if self.best is None or self.best.best_step is None or not es.restore_best:
            return
        s.model_step = self.best.best_step
        if s.model_step != s.step:
            restore_weights(
                self.checkpoint_root / f"step-{s.model_step:06d}", self.model, rank=self.info.rank
            )
        if self.info.is_main:
            print(
                f"restore_best: the result holds step {s.model_step}'s weights ({es.metric} {self.best.best})",
                file=sys.stderr,
            )

    def _say_stopped(self) -> None:
        """Log and print why the run ended before total_steps."""
        assert self.best is not None
        if self.logger is not None:
            self.logger.log("event", self.state.step, self.best.stop_event())
        if self.info.is_main:
            print(self.best.stop_message(self.state.step), file=sys.stderr)

    def _progress(self) -> Any:

        live = self.info.is_main and self.settings.progress and sys.stderr.isatty()
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[rate]} "
                + self.settings.unit
                + "/s  {task.fields[mfu]}"
            ),
            TimeRemainingColumn(),
            disable=not live,
        )


def summary(state: LoopState) -> dict[str, Any]:
    d = asdict(state)
    d.pop("losses")
    return d
