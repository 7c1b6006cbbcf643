"""Non-finite numbers: refused in every config (exit 2 naming the key), and a step that leaves a weight
non-finite is rolled back like a NaN-loss step (weights and optimizer state as before it, counted, and
`max_bad_steps` in a row still exits 4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from lmforge.cli import main
from lmforge.config import Section, load_config
from lmforge.errors import ConfigError
from lmforge.train.loop import NonFiniteError
from train_helpers import make_trainer


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["pretrain", "optim.lr=inf"], "optim.lr"),
        (["pretrain", "optim.lr=1e400"], "optim.lr"),
        (["pretrain", "optim.lr=nan"], "optim.lr"),
        (["pretrain", "optim.lr=-inf"], "optim.lr"),
        (["pretrain", "optim.lr=.inf"], "optim.lr"),
        (["pretrain", "optim.grad_clip=.nan"], "optim.grad_clip"),
        (["pretrain", "model_overrides={rope_theta: .inf}"], "model_overrides.rope_theta"),
        (["finetune", "optim.lr=inf", "base=tiny"], "optim.lr"),
        (["align dpo", "beta=nan"], "beta"),
        (["prepare", "input=x", "dedup.threshold=inf"], "dedup.threshold"),
        (["generate", "model=x", "sampling.temperature=inf"], "sampling.temperature"),
    ],
)
def test_cli_refuses_non_finite_numbers(
    argv: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = argv[0].split()
    assert main([*cmd, *argv[1:], f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"{key}: input should be a finite number" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_yaml_inf_and_nan_are_refused_in_nested_dict_list_and_untyped_values(tmp_path: Path) -> None:
    class Inner(Section):
        x: float = 1.0

    class Schema(Section):
        inner: Inner = Inner()
        weights: dict[str, float] = Field(default_factory=dict)
        scales: list[float] = Field(default_factory=list)
        extra: dict[str, Any] = Field(default_factory=dict)

    for body, key in [
        ("inner:\n  x: .inf\n", "inner.x"),
        ("weights: {a: 1.0, b: .nan}\n", "weights.b"),
        ("scales: [1.0, -.inf]\n", "scales.1"),
        ("extra: {deep: {v: [0, .NaN]}}\n", "extra.deep.v.1"),
    ]:
        path = tmp_path / "c.yaml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {key}: input should be a finite number")):
            load_config(Schema, path)
    with pytest.raises(ConfigError, match=r"scales\.0: input should be a finite number"):
        load_config(Schema, overrides=["scales=[1e400]"])
    assert load_config(Schema, overrides=["inner.x=1e300", "scales=[0.5]"]).inner.x == 1e300


def _snapshot(t: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    state = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in enumerate(t.optimizer.state.values())
    }
    return weights, state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(a == b)


def _poison_on(t: Any, steps: set[int]) -> None:
    """After the optimizer's update on each step in `steps`, one weight becomes inf (as a huge update would)."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if t.state.step in steps:
            with torch.no_grad():
                t.params[3].view(-1)[0] = float("inf")

    t.optimizer.register_step_post_hook(hook)


def test_a_step_that_leaves_a_weight_non_finite_is_rolled_back(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "a", steps=6)
    _poison_on(t, {2, 3})
    for _ in range(2):
        assert t.train_step()["skipped"] is False  # type: ignore[index]
    before = _snapshot(t)
    out = t.train_step()
    assert out is not None and out["skipped"] is True
    assert _same(_snapshot(t), before)  # weights and optimizer state exactly as before step 2
    assert t.state.bad_steps == 1 and t.state.consecutive_bad == 1 and t.state.step == 3
    assert t.train_step()["skipped"] is True  # type: ignore[index]
    assert _same(_snapshot(t), before) and t.state.consecutive_bad == 2
    assert t.train_step()["skipped"] is False  # type: ignore[index]
    assert t.state.consecutive_bad == 0 and t.state.bad_steps == 2
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_the_first_step_rolls_back_to_no_optimizer_state(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "a", steps=2)
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    _poison_on(t, {0})
    assert t.train_step()["skipped"] is True  # type: ignore[index]
    assert _same({k: v for k, v in t.model.state_dict().items()}, weights)
    assert len(t.optimizer.state) == 0


def test_consecutive_non_finite_weights_stop_the_run(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "a", steps=10, max_bad_steps=3)
    _poison_on(t, set(range(1, 10)))
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as e:
        t.run()
    assert e.value.exit_code == 4 and t.state.bad_steps == 3 and t.state.step == 4
