"""Schedules, optimizer groups, the sampler and RNG/optimizer serialisation: the loop's building blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lmforge.model.config import get_preset
from lmforge.model.lora import LoraConfig
from lmforge.model.transformer import build_model
from lmforge.train.checkpoint import _flatten_optimizer, _unflatten_optimizer, rng_state, set_rng_state
from lmforge.train.optim import OptimConfig, build_optimizer, param_groups
from lmforge.train.prepare import prepare_model
from lmforge.train.sampler import BatchSampler, TokenWindows, eval_batches
from lmforge.train.schedule import ScheduleConfig, lr_multiplier
from train_helpers import TinyLM, token_stream


def test_schedules_hit_their_landmarks() -> None:
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cos) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(9, 110, cos) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cos) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cos) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(110, 110, cos) == pytest.approx(0.1)
    lin = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_multiplier(s, 4, lin) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_multiplier(50, 100, ScheduleConfig(kind="constant", warmup_steps=5)) == 1.0
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, 100, wsd) == 1.0  # stable until the last 20 steps
    assert lr_multiplier(89, 100, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, wsd) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])  # type: ignore[attr-defined]
    assert decayed == [
        "head.weight",
        "layers.0.proj.weight",
        "layers.0.qkv.weight",
        "layers.1.proj.weight",
        "layers.1.qkv.weight",
    ]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # type: ignore[arg-type]
    opt = build_optimizer(model, OptimConfig(lr=1e-3, beta2=0.99))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_global_batch_is_the_same_for_any_world_size() -> None:
    windows = TokenWindows([token_stream(5000), token_stream(3000, seed=1)], seq_len=32)
    whole = BatchSampler(windows, global_batch=8, micro_batch=8, seed=3).micro_batches(5)[0]["input_ids"]
    for world, micro in ((2, 2), (4, 1), (2, 4)):
        rows = []
        for rank in range(world):
            s = BatchSampler(windows, global_batch=8, micro_batch=micro, rank=rank, world_size=world, seed=3)
            assert s.accum_steps == 8 // (micro * world)
            rows += [b["input_ids"] for b in s.micro_batches(5)]
        assert torch.equal(torch.cat(rows), whole)


def test_windows_cross_shards_and_each_epoch_visits_every_window_once() -> None:
    a, b = np.arange(0, 50, dtype=np.uint16), np.arange(50, 100, dtype=np.uint16)
    windows = TokenWindows([a, b], seq_len=10)
    assert windows.num_windows == 9  # (100 - 1) // 10
    assert windows.window(4).tolist() == list(range(40, 51))  # spans the shard boundary at 50
    s = BatchSampler(windows, global_batch=3, micro_batch=3, seed=0)
    epoch = np.concatenate([s.global_indices(k) for k in range(3)])
    assert sorted(epoch.tolist()) == list(range(9))
    assert not np.array_equal(s.global_indices(3), s.global_indices(0))  # a new permutation next epoch
    batch = s.micro_batches(0)[0]
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])  # targets are shifted inputs
    assert len(eval_batches(windows, 2, 4)) == 2 and eval_batches(windows, 2, 4)[0]["input_ids"].shape == (
        4,
        10,
    )


def test_rng_and_optimizer_state_round_trip_without_pickle() -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = rng_state()
    expect = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(saved)
    assert (
        torch.equal(torch.rand(3), expect[0])
        and np.random.rand() == expect[1]
        and random.random() == expect[2]
    )

    model = TinyLM()
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    tensors, meta = _flatten_optimizer(osd)
    assert "embed.weight/exp_avg" in tensors and all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = _unflatten_optimizer(tensors, meta)
    assert torch.equal(back["state"]["head.weight"]["exp_avg_sq"], osd["state"]["head.weight"]["exp_avg_sq"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    from lmforge.train.prepare import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = TinyLM()
    ckpt = TinyLM()
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, 64, (2, 16))
    for m in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks: checkpoint replays the RNG state in recompute
        m(ids).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=n)


def test_prepare_model_order_adapters_checkpointing_compile_per_block() -> None:
    """prepare_model: LoRA, then activation checkpointing, then torch.compile of each block in place (the
    model itself is not compiled; parameter names, which checkpoints use, are the LoRA model's)."""
    model = build_model(get_preset("tiny", n_layers=2), device="cpu", dtype=torch.float32)
    train_model, summary = prepare_model(
        model,
        device=torch.device("cpu"),
        method="lora",
        lora=LoraConfig(),
        activation_checkpointing=True,
        compile=True,
    )
    assert train_model is model  # one process: no DDP wrapper
    assert summary is not None and summary["method"] == "lora" and 0 < summary["fraction"] < 1
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
    assert getattr(model, "_compiled_call_impl", None) is None
    assert all("forward" in vars(b) for b in model.layers)  # the checkpointed forward the compile wraps
    assert not any("_orig_mod" in n for n, _ in model.named_parameters())
    assert any("lora" in n for n, p in model.named_parameters() if p.requires_grad)
