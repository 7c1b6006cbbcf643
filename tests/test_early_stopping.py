"""Early stopping in the shared loop, through `lmforge pretrain`: a run on tiny data at a high learning rate
overfits, its validation loss stops falling, and the run stops before max_steps keeping its best checkpoint.

Measured (3.3K training tokens, lr 3e-2, eval every 4 steps, patience 2): best val loss 5.44 at step 40,
stopped at step 48 of 80; ~6 s on one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.early_stop import BestTracker, EarlyStoppingConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import CONFIG, train
from train_helpers import make_tokens_dir, shakespeare_text

MAX_STEPS = 80
PATIENCE = 2


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokens_dir(tmp_path_factory.mktemp("es") / "tokens", shakespeare_text(8000), val_every=10)


def args(tokens: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "seq_len=32",
        "global_batch=8",
        "micro_batch=8",
        "optim.lr=3e-2",  # high for 3K tokens: it overfits within ~50 steps
        "schedule.kind=constant",
        "schedule.warmup_steps=0",
        "eval.every=4",
        "eval.batches=2",
        "eval.sample_tokens=0",
        "checkpoint.every=4",
        "checkpoint.keep=1",  # the best must survive pruning to one
        f"early_stopping.patience={PATIENCE}",
        "early_stopping.restore_best=true",
        f"max_steps={MAX_STEPS}",
        "log_every=1",
        "threads=1",
        "progress=false",
        "tensorboard=false",
        f"data={tokens}",
        f"output={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def stopped(tokens: Path) -> Path:
    """A run that stops early: lmforge pretrain through the CLI."""
    out = tokens.parent / "run"
    assert main(["pretrain", *args(tokens, out)]) == 0
    return out


def test_a_plateau_stops_the_run_and_model_is_the_best_checkpoint(stopped: Path) -> None:
    out = stopped
    records = read_metrics(out / "metrics.jsonl")
    evals = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval" and r["step"] > 0]
    [stop] = [r for r in records if r.get("message") == "early stopping"]
    last_step = max(r["step"] for r in records if r["kind"] == "train")
    best_step, best = min(evals, key=lambda e: e[1])
    assert last_step == stop["step"] == evals[-1][0] < MAX_STEPS
    assert (stop["best_step"], stop["best"]) == (best_step, best)
    # the last `patience` evaluations are no better than the best, every one before them improved on it
    assert [s for s, _ in evals[-PATIENCE:]] != [] and all(v >= best for _, v in evals[-PATIENCE:])
    assert evals[-PATIENCE - 1] == (best_step, best)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step-{best_step:06d}", f"step-{last_step:06d}"]  # keep=1 plus the best
    model = load_file(out / "model" / "model.safetensors")
    at_best = load_file(out / "checkpoints" / f"step-{best_step:06d}" / "model.safetensors")
    at_last = load_file(out / "checkpoints" / f"step-{last_step:06d}" / "model.safetensors")
    assert all(model[k].equal(at_best[k]) for k in model)
    assert not all(model[k].equal(at_last[k]) for k in model)


def test_resume_of_an_early_stopping_run_is_bit_exact(tokens: Path, stopped: Path, tmp_path: Path) -> None:
    ref, cut = stopped, tmp_path / "cut"
    with pytest.raises(LmforgeError, match="stopped by signal at step 30"):  # between evaluations 28 and 32
        train(load_config(CONFIG, None, args(tokens, cut)), should_stop=lambda step, micro: step == 30)
    assert train(load_config(CONFIG, None, args(tokens, cut, "resume=auto"))) == 0

    def history(run: Path) -> dict[tuple[str, int], float]:
        rows = read_metrics(run / "metrics.jsonl")
        return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss", r.get("best"))) for r in rows}

    assert history(cut) == history(ref)  # every loss, validation loss and the stop: bit-identical
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == sorted(
        p.name for p in (ref / "checkpoints").iterdir()
    )


def test_tracker_min_delta_mode_and_a_missing_metric() -> None:
    t = BestTracker(EarlyStoppingConfig(patience=2, min_delta=0.1, metric="val_acc", mode="max"))
    assert t.update(1, {"val_acc": 0.5}) and not t.update(2, {"val_acc": 0.55})  # +0.05 < min_delta
    assert not t.exhausted and t.update(3, {"val_acc": 0.7}) and t.bad_evals == 0
    assert not t.update(4, {"val_acc": 0.7}) and not t.update(5, {"val_acc": 0.1}) and t.exhausted
    assert t.state() == {"best": 0.7, "best_step": 3, "bad_evals": 2}
    with pytest.raises(LmforgeError, match=r"early_stopping.metric: 'val_acc' .* reports val_loss"):
        BestTracker(EarlyStoppingConfig(metric="val_acc")).update(1, {"val_loss": 1.0, "samples": []})


def test_early_stopping_without_validation_data_is_a_config_error(tmp_path: Path) -> None:
    import dataclasses

    from train_helpers import make_trainer

    trainer = make_trainer(tmp_path)
    settings = dataclasses.replace(trainer.settings, early_stopping=EarlyStoppingConfig(patience=1))
    with pytest.raises(LmforgeError, match="early_stopping: needs validation data"):
        type(trainer)(
            model=trainer.model,
            train_model=trainer.model,
            optimizer=trainer.optimizer,
            batches=trainer.batches,
            objective=trainer.objective,
            settings=settings,
            run_dir=tmp_path,
        )


def test_lora_restore_best_exports_the_best_adapter(tokens: Path, tmp_path: Path) -> None:
    """finetune (LoRA): the adapter/ written at the end holds the best checkpoint's adapter weights, which
    are loaded back into the live model (the adapter is saved from it, not copied from a checkpoint)."""
    import hashlib
    import json

    rows = [{"prompt": f"Say {w}:", "completion": f" {w}."} for w in ("ay", "nay", "hark", "lo", "fie")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    out = tmp_path / "sft"
    argv = ["finetune", "base=tiny", f"tokenizer={tokens / 'tokenizer'}", "method=lora", "seq_len=32"]
    argv += ["global_batch=4", "micro_batch=4", "max_steps=12", "optim.lr=0.3", "schedule.warmup_steps=0"]
    argv += ["eval.every=2", "checkpoint.every=0", "checkpoint.keep=1", "early_stopping.restore_best=true"]
    # "best" = the highest validation loss: an early step whatever the machine's rounding, so that the
    # exported adapter must come from a checkpoint other than the last one
    argv += ["early_stopping.mode=max"]
    argv += [
        f"data.train=[{tmp_path / 'sft.jsonl'}]",
        f"data.val=[{tmp_path / 'val.jsonl'}]",
        f"output={out}",
    ]
    assert main([*argv, "threads=1", "progress=false", "tensorboard=false", "log_every=1"]) == 0
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl", "eval") if r["step"] > 0]
    best_step = max(evals, key=lambda e: e[1])[0]
    assert best_step < 12

    def tensors(file: Path) -> list[str]:  # names differ (PEFT vs lmforge), the values must not
        return sorted(
            hashlib.sha256(t.float().numpy().tobytes()).hexdigest() for t in load_file(file).values()
        )

    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step-{best_step:06d}", "step-000012"]
    assert tensors(out / "adapter" / "adapter_model.safetensors") == tensors(
        out / "checkpoints" / f"step-{best_step:06d}" / "model.safetensors"
    )
    assert tensors(out / "adapter" / "adapter_model.safetensors") != tensors(
        out / "checkpoints" / "step-000012" / "model.safetensors"
    )
