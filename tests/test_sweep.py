"""`lmforge sweep`: config errors, trial configs, the results it writes, crash recovery, real sweeps.

The slow tests run real sweeps of a tiny `lmforge pretrain` (0.05M parameters, 40 steps) on Shakespeare
tokens: 6 trials over the learning rate (best, pruning, best.yaml rerun bit for bit, optuna-dashboard), a
kill -9 of the sweep and its rerun, and two sweeps at once on one PostgreSQL study (tests/test_sweep_pg.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.sweep.config import SweepConfig, merge, trial_config
from lmforge.sweep.report import rows, summary, tables, write_results
from lmforge.sweep.study import HOST, Sweeper, open_study
from lmforge.sweep.trial import MetricsTail, steps_done
from lmforge.train.metrics import read_metrics
from train_helpers import make_tokens_dir, shakespeare_text

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STATES = optuna.trial.TrialState

# 40 steps of a 1-layer, width-32 Llama on sequences of 32 tokens; validation every 5 steps.
BASE = {
    "command": "pretrain",
    "model": "tiny",
    "model_overrides": {"dim": 32, "n_layers": 1},
    "seq_len": 32,
    "global_batch": 4,
    "micro_batch": 4,
    "max_steps": 40,
    "optim": {"lr": 1e-3},
    "eval": {"every": 5, "batches": 2, "batch_size": 4, "sample_tokens": 0},
    "log_every": 1,
    "progress": False,
    "tensorboard": False,
    "checkpoint": {"every": 0},
    "threads": 1,
}


def sweep_yaml(tmp: Path, tokens: Path | None, **over: Any) -> Path:
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump({**BASE, "data": str(tokens or tmp / "tokens"), "output": "unused"}))
    cfg: dict[str, Any] = {
        "command": "sweep",
        "output": str(tmp / "sweep"),
        "train": {"command": "pretrain", "config": str(base), "fixed": {"schedule.warmup_steps": 2}},
        "params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True}},
        "trials": 6,
        "sampler": "random",
        "pruner": {"kind": "median", "startup_trials": 2, "warmup_steps": 10},
        "poll_s": 0.1,
    }
    for key, value in over.items():
        merge(cfg, key.replace("__", "."), value)
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("over", "expected"),
    [
        (
            {"params": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}},
            "params.optim.lr: value error",
        ),
        (
            {"params": {"optim.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
            "log=true needs low > 0",
        ),
        ({"params": {"seed": {"type": "categorical"}}}, "categorical needs a non-empty `choices` list"),
        ({"trials_in_parallel": 0}, "trials_in_parallel must be >= 1 or auto"),
        ({"train": {"fixed": {"output": "x"}}}, "['output'] are set by the sweep for each trial"),
        ({"pruner": {"kind": "hyperband"}}, "pruner.kind: input should be 'median', 'halving' or 'none'"),
        (
            {"train": {"config": "/nonexistent/base.yaml"}},
            "train.config: /nonexistent/base.yaml: config file not found",
        ),
        ({"enqueue": [{"optim.lrr": 1e-3}]}, "enqueue.0: ['optim.lrr'] are not in params (optim.lr)"),
    ],
)
def test_bad_sweep_configs_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], over: dict[str, Any], expected: str
) -> None:
    path = sweep_yaml(tmp_path, None)
    cfg = yaml.safe_load(path.read_text())
    for key, value in over.items():
        if key == "params":  # its keys are dotted config keys: replace, do not nest
            cfg[key] = value
        else:
            merge(cfg, key, value)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_a_trial_config_the_trainer_rejects_is_reported_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sweep_yaml(tmp_path, None, train__fixed={"optim.lrr": 1e-3})
    assert main(["sweep", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "does not load for `lmforge pretrain`" in err and "unknown key 'optim.lrr'" in err, err
    assert not (tmp_path / "sweep" / "study.db").exists()  # no study was made


def test_trial_config_merges_base_fixed_and_params(tmp_path: Path) -> None:
    cfg = load_config(SweepConfig, sweep_yaml(tmp_path, None, train__fixed={"eval": {"every": 10}}))
    base = {**BASE, "data": "tokens", "resume": "auto"}
    tree = trial_config(cfg, base, {"optim.lr": 0.01}, tmp_path / "trials" / "0003")
    assert tree["optim"] == {"lr": 0.01}
    # A mapping merges into the base's mapping: eval.batches etc. stay.
    assert tree["eval"] == {"every": 10, "batches": 2, "batch_size": 4, "sample_tokens": 0}
    assert tree["schedule"] == {"warmup_steps": 2}
    assert tree["output"] == str(tmp_path / "trials" / "0003") and "resume" not in tree
    assert base["optim"] == {"lr": 1e-3}  # the base tree is not changed


# -- pieces of a running sweep --------------------------------------------------------------------------
def test_metrics_tail_reads_whole_lines_across_the_final_rename(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stage = tmp_path / "run.partial"
    stage.mkdir()
    tail = MetricsTail(run)
    assert tail.read() == []
    with open(stage / "metrics.jsonl", "w") as f:
        f.write('{"kind": "eval", "step": 0, "val_bpb": 5.5}\n{"kind": "train", "st')
    assert [r["step"] for r in tail.read()] == [0]
    with open(stage / "metrics.jsonl", "a") as f:
        f.write('ep": 5}\n')
    stage.rename(run)  # the trainer publishes the run
    assert tail.read() == [{"kind": "train", "step": 5}]
    (run / "checkpoints" / "step-000040").mkdir(parents=True)
    (run / "checkpoints" / "step-000040" / "state.json").write_text("{}")
    assert steps_done(run, [{"step": 35}]) == 40


def _study_with(tmp_path: Path, trials: list[dict[str, Any]]) -> tuple[SweepConfig, optuna.Study]:
    cfg = load_config(SweepConfig, sweep_yaml(tmp_path, None))
    study = open_study(cfg)
    dist = optuna.distributions.FloatDistribution(1e-5, 3e-2, log=True)
    for t in trials:
        study.add_trial(
            optuna.trial.create_trial(
                state=t["state"],
                value=t.get("value"),
                params={"optim.lr": t["lr"]},
                distributions={"optim.lr": dist},
                intermediate_values=t.get("iv", {}),
                user_attrs={"steps": t["steps"], "max_steps": 40, **t.get("attrs", {})},
            )
        )
    return cfg, study


def test_results_table_best_config_and_steps_saved(tmp_path: Path) -> None:
    cfg, study = _study_with(
        tmp_path,
        [
            {"state": STATES.COMPLETE, "value": 3.0, "lr": 1e-3, "steps": 40},
            {"state": STATES.COMPLETE, "value": 2.5, "lr": 3e-3, "steps": 40},
            {"state": STATES.PRUNED, "value": 4.0, "lr": 1e-5, "steps": 12, "iv": {10: 4.0}},
            {
                "state": STATES.FAIL,
                "lr": 3e-2,
                "steps": 8,
                "attrs": {"error": "exit code 4: error: non-finite"},
            },
        ],
    )
    info = write_results(cfg, study, {**BASE, "data": "tokens"}, plots=True)
    assert info["best"] == {"trial": 1, "value": 2.5, "params": {"optim.lr": 3e-3}}
    assert (info["trial_steps"], info["trial_steps_without_pruning"]) == (100, 160)
    assert info["steps_saved"] == 0.375
    assert info["states"] == {"complete": 2, "pruned": 1, "fail": 1, "running": 0}
    out = tmp_path / "sweep"
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "trial,state,val_bpb,steps,max_steps,seconds,optim.lr,error"
    assert csv_rows[3] == "2,pruned,4,12,40,,1e-05,"  # a pruned trial shows its last evaluation
    assert csv_rows[4].endswith(",exit code 4: error: non-finite")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["optim"] == {"lr": 3e-3} and best["output"] == str(out / "best")
    assert best["command"] == "pretrain" and best["schedule"] == {"warmup_steps": 2}
    assert (out / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    md, _ = tables(cfg, rows(study))
    assert md.splitlines()[3].startswith("| 1 | complete | 2.5 | 40 | 40 |")
    assert summary(cfg, rows(study))["best"]["trial"] == 1


def test_a_trial_left_running_by_a_dead_sweep_is_resumed_with_its_number_and_params(tmp_path: Path) -> None:
    cfg, study = _study_with(tmp_path, [{"state": STATES.COMPLETE, "value": 3.0, "lr": 1e-3, "steps": 40}])
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Trial 1: a sweep on this host whose pid is gone; trial 2: a live sweep elsewhere (fresh heartbeat);
    # trial 3: a sweep elsewhere silent for longer than grace_s.
    for owner in (
        {"owner": f"{HOST}:{dead.pid}:x", "host": HOST, "pid": dead.pid, "heartbeat": time.time()},
        {"owner": "other:1:y", "host": "other", "pid": 1, "heartbeat": time.time()},
        {"owner": "other:2:z", "host": "other", "pid": 2, "heartbeat": time.time() - 1000},
    ):
        trial = study.ask()
        trial.suggest_float("optim.lr", 1e-5, 3e-2, log=True)
        for k, v in owner.items():
            trial.set_user_attr(k, v)
    sweeper = Sweeper(cfg.model_copy(update={"heartbeat_s": 0.05}), study, {})
    picked = [sweeper.next_trial() for _ in range(2)]
    assert [(t.number, resumed) for t, resumed in picked if t is not None] == [(1, True), (3, True)]
    frozen = study.get_trials(deepcopy=False)
    assert [t.user_attrs["owner"] for t in frozen[1:4:2]] == [sweeper.owner] * 2
    assert frozen[2].user_attrs["owner"] == "other:1:y"  # a live sweep's trial is left alone
    params = [frozen[n].params for n in (1, 3)]
    assert [suggest_back(picked[i][0]) for i in range(2)] == params  # same params, not new ones
    nxt = sweeper.next_trial()  # then new trials, up to `trials` (6) in all
    assert nxt is not None and (nxt[0].number, nxt[1]) == (4, False)


def test_enqueued_params_are_the_first_trial_once_and_tpe_startup_is_configured(tmp_path: Path) -> None:
    path = sweep_yaml(tmp_path, None, enqueue=[{"optim.lr": 3e-3}], sampler="tpe", sampler_startup_trials=3)
    cfg = load_config(SweepConfig, path)
    study = open_study(cfg)
    assert study.sampler._n_startup_trials == 3  # type: ignore[attr-defined]
    first = study.ask()
    assert suggest_back(first) == {"optim.lr": 3e-3}
    study.tell(first, 2.0)
    again = open_study(cfg)  # a rerun (or a second machine) does not enqueue it twice
    assert len(again.get_trials(deepcopy=False)) == 1
    assert suggest_back(again.ask()) != {"optim.lr": 3e-3}


def suggest_back(trial: optuna.Trial) -> dict[str, float]:
    return {"optim.lr": trial.suggest_float("optim.lr", 1e-5, 3e-2, log=True)}


# -- real sweeps ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokens_dir(
        tmp_path_factory.mktemp("tokens") / "tokens", shakespeare_text(100_000), vocab_size=320
    )


def final_bpb(run: Path) -> float:
    return float(read_metrics(run / "metrics.jsonl", "eval")[-1]["val_bpb"])


def study_of(path: Path) -> optuna.Study:
    cfg = load_config(SweepConfig, path)
    return optuna.load_study(study_name=cfg.name(), storage=cfg.storage_url())


@pytest.mark.slow
def test_six_trials_over_lr_best_pruned_and_best_yaml_reruns_it(tokens: Path, tmp_path: Path) -> None:
    path = sweep_yaml(tmp_path, tokens, trials_in_parallel=2)
    done = subprocess.run(
        [PY, "-m", "lmforge", "sweep", "-c", str(path)], env=env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study_of(path).get_trials()
    assert [t.number for t in trials] == list(range(6))
    complete = [t for t in trials if t.state == STATES.COMPLETE]
    pruned = [t for t in trials if t.state == STATES.PRUNED]
    assert len(complete) >= 2 and len(pruned) >= 1, [t.state for t in trials]
    for t in pruned:  # stopped early: fewer steps than max_steps, at or after the pruner's warm-up
        assert 10 <= t.user_attrs["steps"] < 40
    for t in complete:  # each value is that run's own final validation
        assert t.value == final_bpb(Path(t.user_attrs["run_dir"]))
    best = min(complete, key=lambda t: t.value)
    info = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert info["best"]["trial"] == best.number and info["best"]["value"] == best.value
    assert all(best.value <= t.value for t in complete)
    assert info["trial_steps"] == sum(t.user_attrs["steps"] for t in trials) < 240
    # best.yaml runs as is and retrains the best trial bit for bit.
    best_yaml = tmp_path / "sweep" / "best.yaml"
    rerun = subprocess.run(
        [PY, "-m", "lmforge", "pretrain", "-c", str(best_yaml)], env=env(), capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert final_bpb(tmp_path / "sweep" / "best") == best.value
    # optuna-dashboard opens the storage and lists the study with its 6 trials.
    assert dashboard_studies(load_config(SweepConfig, path).storage_url()) == {"sweep": 6}


def dashboard_studies(storage: str) -> dict[str, int]:
    """{study name: trials} from optuna-dashboard's JSON API, called through its WSGI app."""
    from optuna_dashboard import wsgi

    app = wsgi(storage)

    def get(path: str) -> Any:
        status: list[str] = []
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "wsgi.input": io.BytesIO(),
            "wsgi.url_scheme": "http",
        }
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    return {s["study_name"]: len(get(f"/api/studies/{s['study_id']}")["trials"]) for s in studies}


@pytest.mark.slow
def test_kill_9_of_the_sweep_then_a_rerun_loses_no_trial_and_runs_none_twice(
    tokens: Path, tmp_path: Path
) -> None:
    path = sweep_yaml(
        tmp_path,
        tokens,
        train__fixed={"schedule.warmup_steps": 2, "checkpoint.every": 5},
        pruner__warmup_steps=20,
    )
    cmd = [PY, "-m", "lmforge", "sweep", "-c", str(path)]
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT)
    victim = tmp_path / "sweep" / "trials" / "0002.partial" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not any(
        r.get("kind") == "eval" and r["step"] >= 10 for r in (read_metrics(victim) if victim.exists() else [])
    ):
        time.sleep(0.2)
    first.kill()  # SIGKILL: no cleanup in the sweep; its trainer gets SIGTERM from the kernel
    first.wait()
    before = study_of(path).get_trials()
    assert [t.state for t in before[:3]] == [STATES.COMPLETE, STATES.COMPLETE, STATES.RUNNING]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 2 was left running by a stopped sweep; resuming it" in done.stdout
    after = study_of(path).get_trials()
    assert [t.number for t in after] == list(range(6))  # none lost, none added
    assert all(t.state in (STATES.COMPLETE, STATES.PRUNED) for t in after)
    assert len({t.params["optim.lr"] for t in after}) == 6  # no params run twice
    assert after[2].params == before[2].params
    run2 = Path(after[2].user_attrs["run_dir"])
    run2 = run2 if run2.exists() else run2.with_name(run2.name + ".partial")
    steps = [r["step"] for r in read_metrics(run2 / "metrics.jsonl", "train")]
    assert steps == sorted(set(steps)) and steps[0] == 1  # continued from its checkpoint: no step twice
    resumed_at = [r["step"] for r in read_metrics(run2 / "metrics.jsonl", "eval")]
    assert resumed_at == sorted(set(resumed_at))
