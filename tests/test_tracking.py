"""TensorBoard and W&B in every trainer: pretrain, finetune and align dpo log the same `train/...` scalar
names through the shared loop, and each writes a W&B run (offline mode, read back from its .wandb file).

The runs: a 2-step pretrain on a tiny tokens directory, then a LoRA finetune and a LoRA DPO run starting
from its model. TensorBoard is checked in this process (~10 s); W&B in one subprocess for the three (wandb
keeps process-wide state; its offline service makes that ~45 s, hence slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.train.metrics import read_metrics
from test_metrics_wandb import read_history
from train_helpers import make_tokens_dir, shakespeare_text

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[1]
COMMON = "log_every=1 progress=false threads=1 tensorboard=true max_steps=2"
RUNS = [
    [
        "pretrain",
        "model=tiny",
        "seq_len=32",
        "global_batch=4",
        "micro_batch=4",
        "eval.every=1",
        "eval.batches=1",
        "eval.sample_tokens=0",
        "data=tokens",
        "output=pretrain",
    ],
    [
        "finetune",
        "base=pretrain/model",
        "seq_len=32",
        "global_batch=4",
        "micro_batch=4",
        "eval.every=1",
        "data.train=[sft.jsonl]",
        "data.val=[sft.jsonl]",
        "output=finetune",
    ],
    [
        "align",
        "dpo",
        "model=pretrain",
        "data=prefs.jsonl",
        "eval_data=prefs.jsonl",
        "max_len=32",
        "max_prompt_len=16",
        "global_batch=4",
        "micro_batch=4",
        "eval.every=1",
        "output=dpo",
    ],
]
SCRIPT = f"""
import sys
from lmforge.cli import main
for argv in {RUNS!r}:
    code = main([*argv, *{COMMON.split()!r}, "wandb_project=lmforge-test"])
    if code:
        sys.exit(code)
"""
TRAIN_NAMES = {"loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tokens_seen", "bad_steps"}


def scalar_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [folder] = {p.parent for p in (run / "tensorboard").glob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def inputs(root: Path) -> Path:
    """The tokens directory and the SFT and preference files the runs read."""
    make_tokens_dir(root / "tokens", shakespeare_text(8000), val_every=10)
    sft = [{"prompt": f"Say {w}:", "completion": f" {w}."} for w in ("ay", "nay", "hark", "lo") * 4]
    prefs = [{"prompt": f"Say {w}:", "chosen": f" {w}.", "rejected": " no."} for w in ("ay", "hark") * 4]
    for name, rows in (("sft.jsonl", sft), ("prefs.jsonl", prefs)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three runs in this process, TensorBoard on."""
    from lmforge.cli import main

    root = inputs(tmp_path_factory.mktemp("tracking"))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for argv in RUNS:
            assert main([*argv, *COMMON.split()]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("trainer", ["pretrain", "finetune", "dpo"])
def test_tensorboard_has_the_same_scalar_names_in_every_trainer(runs: Path, trainer: str) -> None:
    run = runs / trainer
    train_tags = {t.removeprefix("train/") for t in scalar_tags(run) if t.startswith("train/")}
    if trainer == "dpo":  # DPO adds its reward statistics
        assert TRAIN_NAMES | {"reward_accuracy", "reward_margin"} <= train_tags
    else:
        assert train_tags == TRAIN_NAMES
    assert "eval/val_loss" in scalar_tags(run)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")]
    assert steps == [1, 2]


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_same_metrics(tmp_path: Path) -> None:
    root = inputs(tmp_path)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for trainer in ("pretrain", "finetune", "dpo"):  # one history row per logged step, as in metrics.jsonl
        run = root / trainer
        [run_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
        rows = [r for r in read_history(run_file) if "train/loss" in r]
        logged = read_metrics(run / "metrics.jsonl", "train")
        assert [int(r["_step"]) for r in rows] == [r["step"] for r in logged] == [1, 2]
        assert [float(r["train/loss"]) for r in rows] == [r["loss"] for r in logged]
        assert all({f"train/{n}" for n in TRAIN_NAMES} <= set(r) for r in rows)
        assert any("eval/val_loss" in r for r in read_history(run_file))
