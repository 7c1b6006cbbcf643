"""`lmforge sweep`: an Optuna study over the config keys of pretrain, finetune or align dpo.

    lmforge sweep -c configs/sweep/demo-lr.yaml
    lmforge sweep -c configs/sweep/demo-lr.yaml trials=30 trials_in_parallel=2
    lmforge sweep -c sweep.yaml storage=postgresql://lmforge@db-host/sweeps     # on each machine
    lmforge sweep -c sweep.yaml backend=ray ray_address=ray://head:10001        # trials as Ray Tune tasks

Each trial is a real run directory (<output>/trials/NNNN) made by the training command in a subprocess;
its evaluations are reported to the study and the pruner stops bad trials early (SIGTERM: the trainer
saves and exits). Rerunning the same command resumes the study, including trials a killed sweep left
running. Outputs: results.md, results.csv, sweep.json, objective.png, importance.png and best.yaml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.config import parse_command
from lmforge.errors import ConfigError
from lmforge.sweep import ray_backend
from lmforge.sweep.config import SweepConfig, first_values, read_base, trial_config, write_yaml
from lmforge.sweep.report import write_results
from lmforge.sweep.study import Sweeper, open_study, parallel_slots, require_optuna
from lmforge.sweep.trial import last_error
from lmforge.train.loop import Interrupted

COMMAND = "sweep"
CONFIG = SweepConfig
DESCRIPTION = (
    "Hyperparameter sweep with Optuna (or Ray Tune: backend=ray) over any config key of a training command (pretrain, finetune, "
    "align dpo): float/int/log/categorical ranges, fixed overrides, a median or successive-halving pruner "
    "on the validation metric, SQLite (default) or PostgreSQL storage, parallel trials, crash-safe "
    "resume. Exit codes: 0 done, 1 no trial completed, 2 bad config, 130 stopped (rerun to resume)."
)
EXAMPLE = "lmforge sweep -c configs/sweep/demo-lr.yaml"


def check_trial_config(cfg: SweepConfig, base: dict[str, object]) -> None:
    """Load one trial's config with the training command itself (`--print-config`): a wrong key or value
    is reported now, once, instead of failing every trial."""
    out = Path(cfg.output)
    path = out / "configs" / "check.yaml"
    write_yaml(path, trial_config(cfg, base, first_values(cfg), out / "trials" / "check"))
    argv = [sys.executable, "-m", "lmforge", *cfg.train.command.split(), "-c", str(path), "--print-config"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log = out / "logs" / "check.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
        raise ConfigError(
            f"train: a trial config ({path}: train.config + train.fixed + params) does not load for "
            f"`lmforge {cfg.train.command}`: {last_error(log).removeprefix('error: ')}"
        )


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, SweepConfig, COMMAND, DESCRIPTION, EXAMPLE)
    require_optuna()
    if cfg.backend == "ray":
        ray_backend.require_ray()
    base = read_base(cfg.train.config, cfg.train.command)
    check_trial_config(cfg, base)
    if cfg.backend == "ray":
        return _finish(cfg, ray_backend.run(cfg, base), base, finished=True)
    study = open_study(cfg)
    n = len(study.get_trials(deepcopy=False))
    print(
        f"sweep: study {cfg.name()!r} ({n} of {cfg.trials} trials so far), {parallel_slots(cfg)} at a time, "
        f"{cfg.objective.direction} {cfg.objective.metric}, pruner {cfg.pruner.kind}",
        flush=True,
    )
    sweeper = Sweeper(cfg, study, base, on_finish=lambda: write_results(cfg, study, base, plots=False))
    return _finish(cfg, study, base, finished=sweeper.run())


def _finish(cfg: SweepConfig, study: Any, base: dict[str, Any], *, finished: bool) -> int:
    info = write_results(cfg, study, base, plots=True)
    _say(cfg, info)
    if not finished:
        raise Interrupted(f"sweep stopped by a signal; rerun `lmforge sweep -c ...` to resume {cfg.name()!r}")
    return 0 if info["best"] is not None else 1


def _say(cfg: SweepConfig, info: dict[str, object]) -> None:
    s = info["states"]
    assert isinstance(s, dict)
    print(
        f"sweep: {info['trials']} trials: {s['complete']} complete, {s['pruned']} pruned, {s['fail']} failed; "
        f"trial-steps {info['trial_steps']:,} of {info['trial_steps_without_pruning']:,} "
        f"({float(info['steps_saved']):.0%} saved by pruning)"  # type: ignore[arg-type]
    )
    best = info["best"]
    if isinstance(best, dict):
        params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        print(f"best: trial {best['trial']}, {cfg.objective.metric} {best['value']:.4f} ({params})")
        print(f"wrote {cfg.output}/results.md, results.csv, objective.png, best.yaml")
        print(f"rerun the best: lmforge {cfg.train.command} -c {cfg.output}/best.yaml")
    else:
        print(f"no trial completed; see {cfg.output}/results.md and {cfg.output}/logs/", file=sys.stderr)
