"""The shared loop: accumulation normalised per token, exact resume (also mid-accumulation), NaN skipping."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.integrity import latest_checkpoint, list_checkpoints
from lmforge.train.loop import EXIT_INTERRUPTED, EXIT_NONFINITE, Interrupted, NonFiniteError
from lmforge.train.objectives import causal_lm
from train_helpers import make_trainer


def weights(t: object) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}  # type: ignore[attr-defined]


def test_loss_falls_and_is_logged_per_step(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, steps=30)
    state = t.run()
    assert state.step == 30 and state.tokens == 30 * 8 * 16
    assert state.losses[0] > 4.0  # ~ln(64) = 4.16 at init
    assert state.losses[-1] < 0.75 * state.losses[0]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [30]


def test_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """8 sequences as 1 x 8 or 4 x 2 micro batches: same per-token loss and the same update."""
    big = make_trainer(tmp_path / "a", steps=3, micro_batch=8)
    small = make_trainer(tmp_path / "b", steps=3, micro_batch=2)
    for t in (big, small):  # dropout would draw different masks for different micro batch shapes
        for m in t.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    a, b = big.run(), small.run()
    assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    for k, v in weights(big).items():
        # Adam turns float-rounding differences of near-zero gradients into ~lr-sized steps: atol 1e-4
        torch.testing.assert_close(v, weights(small)[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("stop_at", [(3, 1), (5, 3)], ids=["mid-accumulation", "step-boundary"])
def test_resume_is_bit_exact(tmp_path: Path, stop_at: tuple[int, int]) -> None:
    """Stop at (step, micro batch), resume in a fresh trainer: every later loss and the weights identical."""
    full = make_trainer(tmp_path / "full", steps=8)
    ref = full.run()

    stopped = make_trainer(tmp_path / "cut", steps=8, should_stop=lambda s, m: (s, m) == stop_at)
    with pytest.raises(Interrupted) as e:
        stopped.run()
    assert e.value.exit_code == EXIT_INTERRUPTED == 130
    saved = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    # mid-accumulation: the partial step is dropped and recomputed; at the last micro batch likewise
    assert saved is not None and saved.name == f"step-{stop_at[0]:06d}"

    resumed = make_trainer(tmp_path / "cut", steps=8, init_seed=123)  # a different init: the checkpoint wins
    assert resumed.resume("auto") == saved
    after = resumed.run()
    assert after.losses == ref.losses[stop_at[0] :]  # bit-identical floats, not approx
    assert stopped.state.losses + after.losses == ref.losses
    w_ref, w_res = weights(full), weights(resumed)
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def nan_at(steps: set[int]):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def objective(model, batch):  # type: ignore[no-untyped-def]
        step = calls["n"] // 4  # 4 micro batches per step
        calls["n"] += 1
        loss, n = causal_lm(model, batch)
        return (loss * float("nan") if step in steps else loss), n

    return objective


def test_nan_step_is_skipped_and_weights_unchanged(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, steps=2, objective=nan_at({2}))
    t.run()
    before = weights(t)
    opt_before = {
        i: {k: v.clone() for k, v in s.items()} for i, s in t.optimizer.state_dict()["state"].items()
    }
    t.settings.total_steps = 3
    t.run()  # step index 2 is the NaN one
    assert t.state.bad_steps == 1 and t.state.consecutive_bad == 1
    assert all(torch.equal(before[k], v) for k, v in weights(t).items())
    opt_after = t.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_before[i][k], opt_after[i][k]) for i in opt_before for k in opt_before[i])
    t.settings.total_steps = 5
    t.run()  # finite again: training goes on and the streak resets
    assert t.state.bad_steps == 1 and t.state.consecutive_bad == 0
    assert not all(torch.equal(before[k], v) for k, v in weights(t).items())


def test_consecutive_nan_steps_stop_the_run(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, steps=10, objective=nan_at({1, 2, 3, 4}), max_bad_steps=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as e:
        t.run()
    assert e.value.exit_code == EXIT_NONFINITE == 4
    assert t.state.step == 4 and t.state.bad_steps == 3


def test_keep_last_k_and_stale_tmp_ignored(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, steps=7, checkpoint_every=2, keep=2)
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    (root / "step-000099.tmp").mkdir()  # a save killed before its rename
    (root / "step-000098").mkdir()  # no state.json: incomplete
    t.run()
    assert [s for s, _ in list_checkpoints(root)] == [6, 7]
    assert latest_checkpoint(root) == root / "step-000007"
    assert not (root / "step-000099.tmp").exists()


def test_mixed_precision_paths_track_fp32(tmp_path: Path) -> None:
    """bf16 autocast, and fp16 autocast with a GradScaler (its state rides in the checkpoint)."""
    ref = make_trainer(tmp_path / "fp32", steps=4).run().losses
    bf16 = make_trainer(
        tmp_path / "bf16", steps=4, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    scaler = torch.amp.GradScaler("cpu")
    fp16 = make_trainer(
        tmp_path / "fp16", steps=4, autocast=lambda: torch.autocast("cpu", dtype=torch.float16), scaler=scaler
    )
    # measured: both within 0.002 of fp32 over 4 steps (4.253, 4.139, 4.032, 3.968)
    assert bf16.run().losses == pytest.approx(ref, abs=0.02)
    assert fp16.run().losses == pytest.approx(ref, abs=0.02)
    assert fp16.state.bad_steps == 0
    import json

    saved = json.loads((tmp_path / "fp16" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert saved["scaler"]["scale"] == scaler.get_scale() == 65536.0


def test_resuming_from_an_earlier_checkpoint_sets_the_later_timeline_aside(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=6, checkpoint_every=2, keep=1).run()  # leaves step 6 only
    root = tmp_path / "checkpoints"
    make_trainer(tmp_path / "other", steps=2).run()  # an earlier checkpoint to roll back to
    early = tmp_path / "other" / "checkpoints" / "step-000002"
    t = make_trainer(tmp_path, steps=4, keep=1)
    t.resume(early)
    t.run()
    assert [s for s, _ in list_checkpoints(root)] == [4]  # the new save survives pruning
    assert latest_checkpoint(root) == root / "step-000004"
    assert (root / "superseded-step-000006" / "state.json").is_file()  # set aside, not deleted


def test_resume_refuses_a_changed_data_order(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=2).run()
    ckpt = tmp_path / "checkpoints" / "step-000002"
    for kw, named in (({"global_batch": 4}, "global_batch=8 (now 4)"), ({"seed": 1}, "seed=0 (now 1)")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            make_trainer(tmp_path / "again", steps=4, **kw).resume(ckpt)
    make_trainer(tmp_path / "same", steps=4).resume(ckpt)  # same settings: fine
