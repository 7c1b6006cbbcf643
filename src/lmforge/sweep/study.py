"""The study and the workers that run its trials: storage, sampler, pruner, ownership and crash recovery.

    study = open_study(cfg)
    Sweeper(cfg, study, base_tree).run()        # returns when the study has `cfg.trials` trials

Ownership: a trial's user attrs say which sweep process runs it (`owner` = host:pid:token, `host`, `pid`)
and when that process last said so (`heartbeat`, every `heartbeat_s`). A sweep that starts (or asks for
work) takes over a RUNNING trial whose owner is gone (same host and its pid is dead, or its heartbeat is
older than `grace_s`): it waits for the dead sweep's trainer to exit, then continues the same trial number
with the same params from its run directory (`resume=auto`). So a killed sweep loses no trial and runs
none twice; a trial is counted once whether it finished, was pruned or failed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from lmforge.errors import ConfigError
from lmforge.sweep.config import SweepConfig, lookup, trial_config, write_yaml
from lmforge.sweep.trial import TERM_WAIT_S, Outcome, run_trial, training_argv

if TYPE_CHECKING:
    import optuna

HOST = socket.gethostname()
SURPLUS = "surplus"  # user attr of a trial asked for after the study was full (several sweeps at once)


def require_optuna() -> ModuleType:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "lmforge sweep needs Optuna: pip install 'lmforge[sweep]' (optuna, matplotlib, psycopg)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; use psycopg 3 (the sweep extra) when that is what is here."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_study(cfg: SweepConfig, seed_offset: int = 0) -> optuna.Study:
    """Create the study, or load it when it exists (a rerun resumes it). Its search space must not change."""
    optuna = require_optuna()
    url = storage_url(cfg.storage_url())
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kw = {"connect_args": {"timeout": 120}}  # several trials and processes write to one file
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kw)
    except Exception as e:  # SQLAlchemy/driver errors: a wrong URL, host or password
        raise ConfigError(f"storage: cannot open {_safe(url)}: {str(e).splitlines()[0]}") from None
    p = cfg.pruner
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps
        ),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_steps, reduction_factor=p.reduction_factor
        ),
        "none": lambda: optuna.pruners.NopPruner(),
    }[p.kind]()
    study = optuna.create_study(
        storage=storage, study_name=cfg.name(), direction=cfg.objective.direction, load_if_exists=True
    )
    # A rerun draws a new sample stream: the same seed would repeat the first trials' params.
    seed = cfg.seed + seed_offset + len(study.get_trials(deepcopy=False))
    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler_startup_trials)
        if cfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    study = optuna.load_study(storage=storage, study_name=cfg.name(), sampler=sampler, pruner=pruner)
    _check_space(cfg, study)
    for params in cfg.enqueue:  # once per study: a rerun or a second machine finds them there
        study.enqueue_trial(params, skip_if_exists=True)
    return study


def _safe(url: str) -> str:
    """A storage URL without its password, for messages."""
    head, sep, tail = url.rpartition("@")
    if not sep or "://" not in head:
        return url
    scheme, cred = head.split("://", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}@{tail}"


def _check_space(cfg: SweepConfig, study: optuna.Study) -> None:
    space = {k: v.model_dump(mode="json") for k, v in cfg.params.items()}
    target = {"command": cfg.train.command, "metric": cfg.objective.metric}
    known = study.user_attrs.get("space")
    if known is None:
        study.set_user_attr("space", space)
        study.set_user_attr("target", target)
    elif known != space or study.user_attrs.get("target") != target:
        raise ConfigError(
            f"study {cfg.name()!r} in {_safe(cfg.storage_url())} was made for another search space or "
            "objective; give this one another study_name or output"
        )


def suggest(trial: optuna.Trial, cfg: SweepConfig) -> dict[str, Any]:
    """The trial's value of every parameter (a resumed trial gets back the values it had)."""
    out: dict[str, Any] = {}
    for key, s in cfg.params.items():
        if s.type == "categorical":
            assert s.choices is not None
            out[key] = trial.suggest_categorical(key, s.choices)
        elif s.type == "int":
            assert s.low is not None and s.high is not None
            out[key] = trial.suggest_int(key, int(s.low), int(s.high), step=int(s.step or 1), log=s.log)
        else:
            assert s.low is not None and s.high is not None
            out[key] = trial.suggest_float(key, s.low, s.high, step=s.step, log=s.log)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parallel_slots(cfg: SweepConfig) -> int:
    if cfg.trials_in_parallel == "auto":
        return max(gpu_count(), 1)
    return cfg.trials_in_parallel


class Sweeper:
    """Runs trials of one study from this process, `parallel_slots(cfg)` at a time."""

    def __init__(
        self,
        cfg: SweepConfig,
        study: optuna.Study,
        base: dict[str, Any],
        on_finish: Callable[[], object] = lambda: None,
    ) -> None:
        self.optuna = require_optuna()
        self.cfg, self.study, self.base, self.on_finish = cfg, study, base, on_finish
        self.out = Path(cfg.output)
        self.owner = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.owned: dict[int, optuna.Trial] = {}
        self.deadline = None if cfg.timeout_s is None else time.time() + cfg.timeout_s
        self.gpus = gpu_count()

    # -- which trial next ----------------------------------------------------------------------------
    def _own(self, trial: optuna.Trial) -> None:
        for key, value in (("owner", self.owner), ("host", HOST), ("pid", os.getpid())):
            trial.set_user_attr(key, value)
        trial.set_user_attr("heartbeat", time.time())
        self.owned[trial.number] = trial

    def _orphans(self) -> list[optuna.trial.FrozenTrial]:
        now, out = time.time(), []
        running = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,))
        for t in running:
            a = t.user_attrs
            if a.get("owner") == self.owner:
                continue
            if "owner" not in a:  # just asked by another sweep, which has not said so yet
                started = t.datetime_start.timestamp() if t.datetime_start else now
                if now - started > self.cfg.grace_s:
                    out.append(t)
                continue
            dead_here = a.get("host") == HOST and not pid_alive(int(a.get("pid", 0)))
            if dead_here or now - float(a.get("heartbeat", 0)) > self.cfg.grace_s:
                out.append(t)
        return out

    def _adopt(self) -> tuple[optuna.Trial, bool] | None:
        """Take over a trial whose sweep is gone: claim it, let a competing claim win or lose, confirm."""
        for frozen in self._orphans():
            trial = self.optuna.trial.Trial(self.study, frozen._trial_id)
            trial.set_user_attr("owner", self.owner)
            time.sleep(min(2.0, self.cfg.heartbeat_s))
            now = self.study.get_trials(deepcopy=False)[frozen.number]
            if now.user_attrs.get("owner") != self.owner or now.state.name != "RUNNING":
                continue
            self._wait_trainer(frozen.user_attrs)
            self._own(trial)
            print(
                f"sweep: trial {frozen.number} was left running by a stopped sweep; resuming it", flush=True
            )
            return trial, True
        return None

    @staticmethod
    def _wait_trainer(attrs: dict[str, Any]) -> None:
        """The dead sweep's trainer got SIGTERM with it; let it save its checkpoint and exit first."""
        pid = int(attrs.get("trainer_pid", 0))
        if not pid or attrs.get("host") != HOST:
            return
        end = time.time() + TERM_WAIT_S
        while pid_alive(pid) and time.time() < end:
            time.sleep(0.2)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def _counted(self) -> int:
        return sum(SURPLUS not in t.user_attrs for t in self.study.get_trials(deepcopy=False))

    def next_trial(self) -> tuple[optuna.Trial, bool] | None:
        """(trial, resumed) to run next, or None when the study is full or time is up."""
        with self.lock:
            if self.stop.is_set():
                return None
            adopted = self._adopt()
            if adopted is not None:
                return adopted
            if self.deadline is not None and time.time() > self.deadline:
                return None
            if self._counted() >= self.cfg.trials:
                return None
            trial = self.study.ask()
            if trial.number >= self.cfg.trials:  # another sweep filled the study meanwhile
                trial.set_user_attr(SURPLUS, True)
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                return None
            self._own(trial)
            return trial, False

    # -- running one ---------------------------------------------------------------------------------
    def run_one(self, trial: optuna.Trial, resumed: bool, slot: int) -> None:
        number, cfg = trial.number, self.cfg
        params = suggest(trial, cfg)
        run_dir = (self.out / "trials" / f"{number:04d}").resolve()
        tree = trial_config(cfg, self.base, params, run_dir)
        config_path = self.out / "configs" / f"trial-{number:04d}.yaml"
        write_yaml(config_path, tree)
        trial.set_user_attr("run_dir", str(run_dir))
        steps = lookup(tree, "max_steps")
        if isinstance(steps, int):
            trial.set_user_attr("max_steps", steps)
        last = steps if isinstance(steps, int) else None
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        print(f"sweep: trial {number} {'resumed' if resumed else 'started'}: {shown}", flush=True)
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        reported = set(trial.study.get_trials(deepcopy=False)[number].intermediate_values)

        def report(step: int, value: float, may_prune: bool) -> bool:
            if step in reported:
                return False
            reported.add(step)
            trial.report(value, step)
            # The final evaluation ends the trial anyway: pruning it there would only discard its result.
            return may_prune and (last is None or step < last) and trial.should_prune()

        started = time.time()
        # A resumed trial continues from its newest checkpoint; one that had finished is only re-reported.
        extra = ["resume=auto"] if resumed else ["overwrite=true"]
        outcome = run_trial(
            training_argv(cfg.train.command, config_path, extra),
            env=env,
            run_dir=run_dir,
            log=self.out / "logs" / f"trial-{number:04d}.log",
            metric=cfg.objective.metric,
            report=report,
            poll_s=cfg.poll_s,
            stop=self.stop,
            on_start=lambda pid: trial.set_user_attr("trainer_pid", pid),
        )
        self.finish(trial, outcome, time.time() - started)

    def finish(self, trial: optuna.Trial, o: Outcome, seconds: float) -> None:
        states = self.optuna.trial.TrialState
        with self.lock:
            self.owned.pop(trial.number, None)
            if o.state == "interrupted":  # the sweep is stopping: left RUNNING for the next one to resume
                return
            trial.set_user_attr("steps", o.steps)
            trial.set_user_attr("seconds", round(float(trial.user_attrs.get("seconds", 0)) + seconds, 1))
            if o.state == "complete":
                self.study.tell(trial, o.value)
            elif o.state == "pruned":
                self.study.tell(trial, state=states.PRUNED)
            else:
                trial.set_user_attr("error", o.error or "failed")
                self.study.tell(trial, state=states.FAIL)
            value = "" if o.value is None else f" {self.cfg.objective.metric} {o.value:.4f}"
            why = f": {o.error}" if o.state == "failed" else ""
            print(f"sweep: trial {trial.number} {o.state}{value} after {o.steps} steps{why}", flush=True)
        self.on_finish()

    # -- the workers ---------------------------------------------------------------------------------
    def _work(self, slot: int) -> None:
        while True:
            picked = self.next_trial()
            if picked is None:
                return
            self.run_one(*picked, slot)

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.cfg.heartbeat_s):
            with self.lock:
                trials = list(self.owned.values())
            for t in trials:
                try:
                    t.set_user_attr("heartbeat", time.time())
                except Exception:  # the trial finished meanwhile (its attrs are frozen)
                    continue

    def run(self) -> bool:
        """Run trials until the study is full (or time is up). SIGTERM/SIGINT stop the trainers and leave
        their trials RUNNING, to be resumed by the next sweep on this study; then this returns False."""
        slots = parallel_slots(self.cfg)
        workers = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(slots)]
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        stopped = threading.Event()

        def on_signal(*_: object) -> None:
            stopped.set()
            self.stop.set()

        old = signal.signal(signal.SIGTERM, on_signal)
        beat.start()
        try:
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                try:
                    for w in workers:
                        w.join(0.2)
                except KeyboardInterrupt:
                    on_signal()
        finally:
            self.stop.set()
            signal.signal(signal.SIGTERM, old)
        return not stopped.is_set()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
