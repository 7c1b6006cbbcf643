"""`lmforge sweep` with `backend: ray`: the same sweep YAML run by Ray Tune, on a local or remote cluster.

    lmforge sweep -c sweep.yaml backend=ray                          # a local Ray started for the sweep
    lmforge sweep -c sweep.yaml backend=ray ray_address=ray://head:10001

Each trial is a Ray task running the trial runner of sweep/trial.py (the training command in a subprocess,
its metrics.jsonl tailed); every evaluation goes to `tune.report`, so Ray Tune's search (OptunaSearch with
the TPE or random sampler, from the same param space) and scheduler (ASHA for `halving`, the median
stopping rule for `median`) read the same metric as the Optuna backend. A trial claims its number by
creating `<output>/ray/claims/NNNN` and writes what it did to NNNN.json there; the driver then records
the trials in the sweep's Optuna storage, so results.md/csv, sweep.json, the plots and best.yaml are the
Optuna backend's own. On a remote cluster `output` must be a folder every node sees (a shared mount).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_json
from lmforge.sweep.config import ParamSpec, SweepConfig, lookup, trial_config, write_yaml
from lmforge.sweep.study import open_study, require_optuna
from lmforge.sweep.trial import run_trial, steps_done, training_argv


def require_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise ConfigError(
            "backend: ray needs Ray Tune: pip install 'lmforge[ray]' (ray[tune], optuna)"
        ) from None
    return ray


def search_space(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's params as Ray Tune domains (int `high` is included, as in the Optuna backend)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, s in cfg.params.items():
        if s.type == "categorical":
            out[key] = tune.choice(list(s.choices or []))
            continue
        assert s.low is not None and s.high is not None
        if s.type == "float":
            out[key] = (
                tune.loguniform(s.low, s.high)
                if s.log
                else tune.quniform(s.low, s.high, s.step)
                if s.step
                else tune.uniform(s.low, s.high)
            )
        elif s.log:
            out[key] = tune.lograndint(int(s.low), int(s.high) + 1)
        else:
            out[key] = tune.qrandint(int(s.low), int(s.high), int(s.step or 1))
    return out


def distributions(cfg: SweepConfig) -> dict[str, Any]:
    """The same params as Optuna distributions: how the driver records Ray's trials in the study."""
    optuna = require_optuna()
    d = optuna.distributions

    def one(s: ParamSpec) -> Any:
        if s.type == "categorical":
            return d.CategoricalDistribution(list(s.choices or []))
        assert s.low is not None and s.high is not None
        if s.type == "int":
            return d.IntDistribution(int(s.low), int(s.high), log=s.log, step=int(s.step or 1))
        return d.FloatDistribution(s.low, s.high, log=s.log, step=s.step)

    return {k: one(s) for k, s in cfg.params.items()}


def scheduler(cfg: SweepConfig, max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    p = cfg.pruner
    if p.kind == "halving":
        return ASHAScheduler(
            time_attr="step", max_t=max_steps, grace_period=p.min_steps, reduction_factor=p.reduction_factor
        )
    if p.kind == "median":
        return MedianStoppingRule(
            time_attr="step", grace_period=p.warmup_steps, min_samples_required=max(p.startup_trials, 1)
        )
    return FIFOScheduler()


def _claim(claims: Path) -> int:
    """The lowest free trial number: mkdir is atomic, also on a shared filesystem."""
    claims.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        try:
            (claims / f"{n:04d}").mkdir()
            return n
        except FileExistsError:
            n += 1


def _plain(v: Any) -> Any:
    """numpy scalars from the search back to Python numbers (YAML and JSON write those)."""
    return v.item() if hasattr(v, "item") else v


def trainable(params: dict[str, Any], sweep: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial, inside a Ray task: claim a number, write its config, run it, report each evaluation."""
    from ray import tune

    cfg = SweepConfig.model_validate(sweep)
    out = Path(cfg.output)
    claims = out / "ray" / "claims"
    number = _claim(claims)
    params = {k: _plain(v) for k, v in params.items()}
    run_dir = (out / "trials" / f"{number:04d}").resolve()
    config_path = out / "configs" / f"trial-{number:04d}.yaml"
    tree = trial_config(cfg, base, params, run_dir)
    write_yaml(config_path, tree)
    record: dict[str, Any] = {
        "number": number,
        "params": params,
        "run_dir": str(run_dir),
        "max_steps": lookup(tree, "max_steps"),
        "state": "running",
        "intermediate": {},
        "started": time.time(),
    }
    atomic_write_json(claims / f"{number:04d}.json", record)

    def report(step: int, value: float, may_prune: bool) -> bool:
        record["intermediate"][str(step)] = value
        record["seconds"] = round(time.time() - record["started"], 1)  # a pruned trial ends after this report
        atomic_write_json(claims / f"{number:04d}.json", record)  # a stopped trial keeps what it reported
        tune.report({cfg.objective.metric: value, "step": step})
        return False  # Ray's scheduler stops the task itself; the trainer gets SIGTERM with it

    print(f"sweep: trial {number} started: {params}", flush=True)
    outcome = run_trial(
        training_argv(cfg.train.command, config_path, ["overwrite=true"]),
        env=dict(os.environ),
        run_dir=run_dir,
        log=out / "logs" / f"trial-{number:04d}.log",
        metric=cfg.objective.metric,
        report=report,
        poll_s=cfg.poll_s,
        stop=threading.Event(),
    )
    record.update(state=outcome.state, value=outcome.value, steps=outcome.steps, error=outcome.error)
    record["seconds"] = round(time.time() - record["started"], 1)
    atomic_write_json(claims / f"{number:04d}.json", record)
    if outcome.state != "complete":
        raise RuntimeError(f"trial {number} {outcome.state}: {outcome.error}")


def _frozen(cfg: SweepConfig, rec: dict[str, Any], dists: dict[str, Any]) -> Any:
    """A Ray trial's record as an Optuna trial: complete, pruned (stopped by the scheduler) or failed."""
    optuna = require_optuna()
    states = optuna.trial.TrialState
    inter = {int(k): float(v) for k, v in rec.get("intermediate", {}).items()}
    state = rec["state"]
    value = rec.get("value")
    steps: int | None = rec.get("steps")
    if state == "running":  # the scheduler ended the task: pruned where it was
        state = "pruned"
        steps = max([*inter, steps_done(Path(rec["run_dir"]), [])], default=0)
    ok = state == "complete" and value is not None and math.isfinite(value)
    attrs = {"run_dir": rec["run_dir"], "steps": steps, "seconds": rec.get("seconds"), "backend": "ray"}
    if isinstance(rec.get("max_steps"), int):
        attrs["max_steps"] = rec["max_steps"]
    if state == "failed" or (state == "complete" and not ok):
        attrs["error"] = rec.get("error") or "failed"
    return optuna.trial.create_trial(
        params=rec["params"],
        distributions=dists,
        value=value if ok else None,
        state=states.COMPLETE if ok else states.PRUNED if state == "pruned" else states.FAIL,
        intermediate_values=inter,
        user_attrs={k: v for k, v in attrs.items() if v is not None},
    )


def record(cfg: SweepConfig, study: Any) -> int:
    """Add the trials of <output>/ray/claims not yet in the study, in number order; returns how many."""
    claims = Path(cfg.output) / "ray" / "claims"
    known = {t.user_attrs.get("run_dir") for t in study.get_trials(deepcopy=False)}
    dists = distributions(cfg)
    added = 0
    for path in sorted(claims.glob("*.json")):
        rec = json.loads(path.read_text("utf-8"))
        if rec["run_dir"] not in known:
            study.add_trial(_frozen(cfg, rec, dists))
            added += 1
    return added


def run(cfg: SweepConfig, base: dict[str, Any]) -> Any:
    """Run the sweep's remaining trials on Ray; returns the Optuna study that now holds them all."""
    ray = require_ray()
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna = require_optuna()
    study = open_study(cfg)
    record(cfg, study)  # a sweep stopped earlier: its finished claims count
    todo = cfg.trials - len(study.get_trials(deepcopy=False))
    if todo <= 0:
        return study
    seed = cfg.seed + len(study.get_trials(deepcopy=False))
    sampler = (
        optuna.samplers.TPESampler(seed=seed)
        if cfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    metric, mode = cfg.objective.metric, "min" if cfg.objective.direction == "minimize" else "max"
    max_steps = lookup(trial_config(cfg, base, {}, Path(cfg.output)), "max_steps", 100)
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
    try:
        fn = tune.with_resources(
            tune.with_parameters(trainable, sweep=cfg.model_dump(mode="json"), base=base),
            dict(cfg.ray_resources),
        )
        tuner = tune.Tuner(
            fn,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=todo,
                search_alg=OptunaSearch(sampler=sampler),
                scheduler=scheduler(cfg, int(max_steps)),
                max_concurrent_trials=None if cfg.trials_in_parallel == "auto" else cfg.trials_in_parallel,
                time_budget_s=cfg.timeout_s,
            ),
            run_config=tune.RunConfig(
                name=f"{cfg.name()}-{int(time.time())}",
                storage_path=str((Path(cfg.output) / "ray" / "tune").resolve()),
                verbose=0,
            ),
        )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    record(cfg, study)
    return study
