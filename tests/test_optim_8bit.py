"""8-bit AdamW (optim.eight_bit): the groups it gets, its memory, its loss, exact resume, the planner's overlay."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.model.integrity import latest_checkpoint
from lmforge.plan.run import main as plan_main
from lmforge.train.distributed import DistInfo
from lmforge.train.finetune import FinetuneConfig
from lmforge.train.loop import EXIT_INTERRUPTED, Interrupted, LoopSettings, Trainer
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import PretrainConfig
from lmforge.train.sampler import BatchSampler, TokenWindows
from lmforge.train.schedule import ScheduleConfig
from train_helpers import TinyLM, make_tokens_dir, shakespeare_text, token_stream

bnb = pytest.importorskip("bitsandbytes")

EIGHT = OptimConfig(lr=3e-3, weight_decay=0.1, eight_bit=True)


def trainer(run_dir: Path, cfg: OptimConfig, *, steps: int = 8, init_seed: int = 0, **kw: Any) -> Trainer:
    """The loop tests' trainer with dim 64: the embedding, qkv, proj and head have >= 4096 elements each,
    so bitsandbytes gives them 8-bit state (smaller tensors keep fp32 moments)."""
    torch.manual_seed(init_seed)
    model = TinyLM(dim=64)
    windows = TokenWindows([token_stream()[:9000], token_stream()[9000:]], 16)
    settings = LoopSettings(
        total_steps=steps,
        lr=cfg.lr,
        schedule=ScheduleConfig(kind="cosine", warmup_steps=2),
        grad_clip=1.0,
        log_every=1,
        progress=False,
    )
    return Trainer(
        model=model,
        train_model=model,
        optimizer=build_optimizer(model, cfg),
        batches=BatchSampler(windows, global_batch=8, micro_batch=2, seed=0),
        objective=causal_lm,
        settings=settings,
        run_dir=run_dir,
        info=DistInfo(),
        **kw,
    )


def state_bytes(opt: torch.optim.Optimizer, p: nn.Parameter) -> int:
    """Bytes of a parameter's own optimizer state (the shared 256-entry quantisation maps excluded)."""
    st = opt.state[p]
    return sum(v.nbytes for k, v in st.items() if isinstance(v, torch.Tensor) and not k.startswith("qmap"))


def test_eight_bit_builds_adamw8bit_with_the_same_groups() -> None:
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, beta1=0.8, beta2=0.9, eps=1e-6, eight_bit=True)
    opt = build_optimizer(TinyLM(dim=64), cfg)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    ref = build_optimizer(TinyLM(dim=64), cfg.model_copy(update={"eight_bit": False}))
    assert isinstance(ref, torch.optim.AdamW)
    assert (
        [len(g["params"]) for g in opt.param_groups]
        == [len(g["params"]) for g in ref.param_groups]
        == [5, 11]
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6


def test_missing_bitsandbytes_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"optim\.eight_bit.*pip install bitsandbytes"):
        build_optimizer(TinyLM(), EIGHT)


def test_eight_bit_state_is_about_a_quarter_of_fp32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False)  # 1,048,576 parameters
    x = torch.randn(8, 1024)
    sizes = {}
    for eight_bit in (False, True):
        opt = build_optimizer(lin, OptimConfig(weight_decay=0.0, eight_bit=eight_bit))
        lin(x).square().mean().backward()
        opt.step()
        lin.zero_grad()
        st = opt.state[lin.weight]
        if eight_bit:
            assert st["state1"].dtype == st["state2"].dtype == torch.uint8
            assert st["absmax1"].numel() == lin.weight.numel() // 256
        sizes[eight_bit] = state_bytes(opt, lin.weight) / lin.weight.numel()
    # fp32: exp_avg + exp_avg_sq = 8 bytes/param (+ a 4-byte step); 8-bit: 2 bytes + 2 fp32 scales per 256
    assert sizes[False] == pytest.approx(8.0, abs=1e-5)
    assert sizes[True] == pytest.approx(2.0 + 8 / 256, abs=1e-5)
    assert sizes[True] / sizes[False] < 0.26


def test_eight_bit_loss_tracks_fp32_adamw(tmp_path: Path) -> None:
    fp32 = trainer(tmp_path / "fp32", EIGHT.model_copy(update={"eight_bit": False}), steps=40).run().losses
    q8 = trainer(tmp_path / "q8", EIGHT, steps=40).run().losses
    assert q8[0] == pytest.approx(fp32[0], rel=1e-6)  # same init and data: the first loss precedes any update
    tail32, tail8 = sum(fp32[-5:]) / 5, sum(q8[-5:]) / 5
    assert tail32 < 0.6 * fp32[0] and tail8 < 0.6 * q8[0]  # both learn
    assert tail8 == pytest.approx(tail32, rel=0.01)  # mean of the last 5 losses within 1% (measured: 0.02%)


@pytest.mark.parametrize("stop_at", [(3, 1), (5, 3)], ids=["mid-accumulation", "step-boundary"])
def test_resume_with_eight_bit_is_bit_exact(tmp_path: Path, stop_at: tuple[int, int]) -> None:
    full = trainer(tmp_path / "full", EIGHT)
    ref = full.run()

    stopped = trainer(tmp_path / "cut", EIGHT, should_stop=lambda s, m: (s, m) == stop_at)
    with pytest.raises(Interrupted) as e:
        stopped.run()
    assert e.value.exit_code == EXIT_INTERRUPTED
    saved = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert saved is not None and saved.name == f"step-{stop_at[0]:06d}"

    resumed = trainer(tmp_path / "cut", EIGHT, init_seed=123)  # a different init: the checkpoint wins
    assert resumed.resume("auto") == saved
    after = resumed.run()
    assert after.losses == ref.losses[stop_at[0] :]  # bit-identical floats
    assert all(
        torch.equal(a, b)
        for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True)
    )

    a_state, b_state = full.optimizer.state, resumed.optimizer.state
    params_a, params_b = list(full.model.parameters()), list(resumed.model.parameters())
    n_uint8 = 0
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = a_state[pa], b_state[pb]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 8
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k
        n_uint8 += sa["state1"].dtype == torch.uint8
    assert n_uint8 == 6  # embedding, 2 x (qkv, proj), head: really 8-bit state


@pytest.mark.parametrize(
    ("schema", "args", "data"),
    [
        (PretrainConfig, ["small"], "data=tokens"),
        (FinetuneConfig, ["small", "method=full"], "data.train=[t.jsonl]"),
    ],
    ids=["pretrain", "finetune"],
)
def test_plan_overlay_with_adamw8bit_loads(tmp_path: Path, schema: Any, args: list[str], data: str) -> None:
    out = tmp_path / "overlay.yaml"
    argv = [*args, "hardware=cpu", "optimizer=adamw8bit", "seq_len=128", "global_batch_tokens=4096"]
    assert plan_main([*argv, f"overlay={out}", "--json"]) == 0
    text = out.read_text()
    unsupported = [line for line in text.splitlines() if line.startswith("# recommended but not settable")]
    assert not any("optim" in line for line in unsupported)  # (finetune has no dist.* keys: listed there)
    assert "optim:\n  eight_bit: true" in text
    cfg = load_config(schema, out, [data, f"output={tmp_path / 'run'}"])
    assert cfg.optim.eight_bit is True


def test_pretrain_cli_with_eight_bit_resumes_exactly(tmp_path: Path) -> None:
    """`lmforge pretrain optim.eight_bit=true`: 6 steps, and 3 more from its step-3 checkpoint into a new
    output, end with identical weights and 8-bit optimizer state (read back from the safetensors files)."""
    tokens = make_tokens_dir(tmp_path / "tokens", shakespeare_text(60_000))
    common = [
        "pretrain", f"data={tokens}", "model=tiny", "seq_len=64", "global_batch=8", "micro_batch=4",
        "max_steps=6", "optim.eight_bit=true", "checkpoint.every=3", "eval.every=0",
    ]  # fmt: skip
    assert cli_main([*common, f"output={tmp_path / 'a'}"]) == 0
    first = tmp_path / "a" / "checkpoints" / "step-000003"
    assert cli_main([*common, f"output={tmp_path / 'b'}", f"resume={first}"]) == 0
    a, b = (tmp_path / run / "checkpoints" / "step-000006" for run in ("a", "b"))
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    opt = load_file(str(a / "optimizer.safetensors"))
    assert sum(v.dtype == torch.uint8 for v in opt.values()) >= 2  # really 8-bit state in the checkpoint
