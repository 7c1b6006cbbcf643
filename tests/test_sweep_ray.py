"""`lmforge sweep` with `backend: ray`: the param space and pruners in Ray Tune's terms, and a real 4-trial
Ray Tune sweep on a local Ray (started and shut down here) over the learning rate of a tiny pretrain."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.sweep.config import SweepConfig
from test_sweep import PY, env, final_bpb, study_of, sweep_yaml
from train_helpers import make_tokens_dir, shakespeare_text

ray = pytest.importorskip("ray", reason="Ray Tune is not installed (pip install 'lmforge[ray]')")
from lmforge.sweep import ray_backend  # noqa: E402

STATES = optuna.trial.TrialState


def test_the_param_space_translates_with_the_same_bounds(tmp_path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    path = sweep_yaml(tmp_path, None)
    tree = yaml.safe_load(path.read_text())
    tree["params"] = {  # dotted keys: replaced, not merged
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
        "micro_batch": {"type": "int", "low": 1, "high": 4},
        "model": {"type": "categorical", "choices": ["tiny", "small"]},
        "warmup": {"type": "int", "low": 1, "high": 16, "log": True},
    }
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(SweepConfig, path)
    space = ray_backend.search_space(cfg)
    lr, wd, mb, model = (space[k] for k in ("optim.lr", "optim.weight_decay", "micro_batch", "model"))
    assert (
        isinstance(lr, Float)
        and (lr.lower, lr.upper) == (1e-5, 1e-2)
        and "LogUniform" in type(lr.sampler).__name__
    )
    assert isinstance(wd, Float) and wd.sampler.q == 0.05
    assert isinstance(mb, Integer) and (mb.lower, mb.upper) == (1, 4)  # quantized: upper included
    assert isinstance(model, Categorical) and model.categories == ["tiny", "small"]
    # Ray's OptunaSearch reads the space as exactly the distributions the Optuna backend suggests from.
    dists = ray_backend.distributions(cfg)
    assert OptunaSearch.convert_search_space(space) == dists
    assert dists["micro_batch"] == optuna.distributions.IntDistribution(1, 4)
    assert dists["warmup"] == optuna.distributions.IntDistribution(1, 16, log=True)


def test_pruners_map_to_asha_and_the_median_stopping_rule(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    def sched(**pruner: object) -> object:
        return ray_backend.scheduler(load_config(SweepConfig, sweep_yaml(tmp_path, None, pruner=pruner)), 40)

    asha = sched(kind="halving", min_steps=5, reduction_factor=2)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 40 and asha._reduction_factor == 2
    median = sched(kind="median", startup_trials=3, warmup_steps=10)
    assert (
        isinstance(median, MedianStoppingRule)
        and median._grace_period == 10
        and median._min_samples_required == 3
    )
    assert isinstance(sched(kind="none"), FIFOScheduler)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokens_dir(tmp_path_factory.mktemp("tokens") / "tokens", shakespeare_text(100_000))


@pytest.mark.slow
def test_four_ray_trials_over_lr_best_is_the_minimum_and_best_yaml_reruns_it(
    tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env().items():
        monkeypatch.setenv(key, value)  # the Ray workers and the trainers find this lmforge
    path = sweep_yaml(tmp_path, tokens, backend="ray", trials=4, trials_in_parallel=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["sweep", "-c", str(path)]) == 0
    finally:
        ray.shutdown()
    trials = study_of(path).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.user_attrs["backend"] == "ray" for t in trials)
    assert [Path(t.user_attrs["run_dir"]).name for t in trials] == ["0000", "0001", "0002", "0003"]
    complete = [t for t in trials if t.state == STATES.COMPLETE]
    assert complete, [t.state for t in trials]
    for t in complete:  # each value is that run's own final validation, reported at every evaluation
        assert t.value == final_bpb(Path(t.user_attrs["run_dir"])) and t.user_attrs["steps"] == 40
        assert sorted(t.intermediate_values) == list(range(0, 41, 5))
    for t in trials:
        if t.state == STATES.PRUNED:  # stopped by the median rule after its warm-up
            assert 10 <= t.user_attrs["steps"] < 40
    info = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    best = min(complete, key=lambda t: t.value)
    assert info["best"] == {"trial": best.number, "value": best.value, "params": best.params}
    assert info["trials"] == 4 and sum(info["states"].values()) == 4
    out = tmp_path / "sweep"
    assert (out / "objective.png").stat().st_size > 1000 and (out / "results.csv").read_text().count(
        "\n"
    ) == 5
    md = (out / "results.md").read_text()
    assert f"Best: trial {best.number}" in md
    assert yaml.safe_load((out / "best.yaml").read_text())["optim"]["lr"] == best.params["optim.lr"]
    rerun = subprocess.run([PY, "-m", "lmforge", "pretrain", "-c", str(out / "best.yaml")], env=env(),
                           capture_output=True, text=True)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert final_bpb(out / "best") == best.value  # bit for bit
