"""`micro_batch=auto` in `lmforge pretrain`: resolved by the planner, halved on out-of-memory, same global batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lmforge.train.pretrain as pretrain
from lmforge.config import load_config
from lmforge.model.config import get_preset
from lmforge.plan.auto import auto_micro_batch, smaller_micro_batch
from lmforge.plan.memory import Setup, memory
from lmforge.train.pretrain import PretrainConfig, train
from train_helpers import make_tokens_dir, shakespeare_text

BASE = [
    "model=tiny",
    "seq_len=64",
    "global_batch=8",
    "max_steps=2",
    "eval.batches=1",
    "eval.batch_size=2",
    "eval.sample_tokens=0",
    "log_every=1",
    "progress=false",
    "tensorboard=false",
]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokens_dir(tmp_path_factory.mktemp("tokens") / "tokens", shakespeare_text(40_000))


def _cfg(tokens: Path, out: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"data={tokens}", f"output={out}", *BASE, *extra])


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_auto_is_the_largest_micro_batch_the_planner_fits() -> None:
    cfg = get_preset("small")
    kw: dict[str, Any] = dict(seq_len=256, global_batch=32, world=1, device=torch.device("cpu"))
    kw.update(precision="fp32", checkpointing=False, fsdp=False)
    assert auto_micro_batch(cfg, **kw) == 32  # 24 GiB of RAM hold all 32 sequences at once
    need4 = memory(Setup(cfg, seq_len=256, micro_batch=4, accum=8, device="cpu")).device_total
    need8 = memory(Setup(cfg, seq_len=256, micro_batch=8, accum=4, device="cpu")).device_total
    assert auto_micro_batch(cfg, **kw, capacity=need4 + 1) == 4
    assert auto_micro_batch(cfg, **kw, capacity=(need4 + need8) / 2) == 4
    assert auto_micro_batch(cfg, **kw, capacity=1.0) == 1
    assert [smaller_micro_batch(m, 24) for m in (8, 6, 3, 1)] == [4, 3, 1, None]


def test_oom_halves_micro_batch_keeping_the_global_batch(
    tokens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """auto resolves to 8 (saved in config.yaml); an injected OOM for micro batches above 2 rows backs off
    8 -> 4 -> 2 within step 0, and the run's losses equal a micro_batch=2 run's exactly."""
    ref = tmp_path / "ref"
    assert train(_cfg(tokens, ref, "micro_batch=2")) == 0
    real = pretrain.causal_lm
    seen: list[int] = []

    def tight_memory(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        if model.training:  # validation batches are not training micro batches
            seen.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(pretrain, "causal_lm", tight_memory)  # the objective pretrain trains with
    out = tmp_path / "auto"
    assert train(_cfg(tokens, out, "micro_batch=auto")) == 0
    err = capsys.readouterr().err
    assert "retrying step 0 with micro_batch 4" in err and "retrying step 0 with micro_batch 2" in err
    assert seen[:2] == [8, 4] and set(seen[2:]) == {2}
    assert len(seen[2:]) == 2 * 4  # 2 steps x 4 micro batches of 2: the global batch stayed 8
    assert _losses(out) == _losses(ref)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["micro_batch"] == 8 and saved["global_batch"] == 8  # what auto resolved to


def test_finetune_lora_auto_backs_off_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lmforge finetune micro_batch=auto` (LoRA): resolves to all 8 rows, an injected OOM halves it to 4."""
    import lmforge.train.finetune as ft
    from lmforge.tokenizer import SpecialTokensConfig, train_tokenizer

    special = SpecialTokensConfig()
    train_tokenizer(["x"], vocab_size=len(special.ordered()) + 256, special_tokens=special).save(
        tmp_path / "tok"
    )
    rows = [json.dumps({"prompt": f"{c}{i}", "completion": c.upper()}) for c in "abcdefgh" for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    real = ft.causal_lm
    seen: list[int] = []

    def tight_memory(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        if model.training:
            seen.append(batch["input_ids"].shape[0])
            if batch["input_ids"].shape[0] > 4:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(ft, "causal_lm", tight_memory)
    cfg = ft.CONFIG.model_validate(
        {
            "base": "tiny",
            "tokenizer": str(tmp_path / "tok"),
            "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 4, "hidden_dim": 172},
            "output": str(tmp_path / "run"),
            "data": {"train": [str(tmp_path / "train.jsonl")]},
            "method": "lora",
            "seq_len": 32,
            "global_batch": 8,
            "micro_batch": "auto",
            "max_steps": 2,
            "threads": 1,
            "progress": False,
            "tensorboard": False,
        }
    )
    assert ft.train(cfg) == 0
    assert "micro_batch=auto: 8" in capsys.readouterr().err
    assert seen == [8, 4, 4, 4, 4]  # step 0 retried as 2 x 4, step 1 as 2 x 4: 8 rows per step
