"""`lmforge plan --probe`: predicted peak memory within 10% of measured, on real training steps on the CPU.

Measurement (see lmforge/plan/probe.py): each probe runs in a fresh process (torchrun + gloo for 2
processes) through the shared training loop on random tokens, after one warm-up step (so the AdamW states
exist), and `MemoryTracker` counts the bytes of live tensors through a TorchDispatchMode with weak
references to their storages (and FSDP2's in-place storage resizes): the CPU counterpart of
`torch.cuda.max_memory_allocated`. With 2 processes the larger of the two ranks' peaks is compared.
"""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.model.config import ModelConfig, get_preset
from lmforge.plan.memory import Setup, memory
from lmforge.plan.probe import probe

GPT2 = ModelConfig(
    arch="gpt2", vocab_size=4096, dim=192, n_layers=4, n_heads=6, hidden_dim=768, max_seq_len=256
)


def _check(s: Setup) -> float:
    measured = probe(s, steps=1, warmup=2)[
        "peak_bytes"
    ]  # step 3 is steady: Adam state and its rollback copy exist
    predicted = memory(s).peak
    assert predicted == pytest.approx(measured, rel=0.10), (predicted / 1e6, measured / 1e6)
    return predicted / measured - 1


def test_cli_probe_prints_measured_beside_predicted(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "tiny", "hardware=cpu", "seq_len=64", "global_batch_tokens=256", "micro_batch=2"]
    assert main([*args, "activation_checkpointing=off", "probe_steps=1", "--probe", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    pr = p["probe"]
    assert pr["predicted_peak_bytes"] == p["memory_bytes"]["peak"]
    assert abs(pr["peak_error"]) < 0.10
    assert pr["tokens_per_s"] > 0 and "MemoryTracker" in pr["method"]


def test_probe_with_activation_checkpointing() -> None:
    _check(Setup(get_preset("tiny"), micro_batch=2, seq_len=64, checkpointing=True, device="cpu"))


SLOW_CASES = {
    "tiny-pretrain": Setup(get_preset("tiny"), micro_batch=4, seq_len=128, device="cpu"),
    "tiny-pretrain-ckpt": Setup(
        get_preset("tiny"), micro_batch=4, seq_len=128, checkpointing=True, device="cpu"
    ),
    "tiny-lora": Setup(get_preset("tiny"), method="lora", micro_batch=4, seq_len=128, device="cpu"),
    "tiny-qlora": Setup(get_preset("tiny"), method="qlora", micro_batch=4, seq_len=128, device="cpu"),
    "small-pretrain": Setup(get_preset("small"), micro_batch=2, seq_len=128, device="cpu"),
    "small-pretrain-ckpt": Setup(
        get_preset("small"), micro_batch=2, seq_len=128, checkpointing=True, device="cpu"
    ),
    "small-lora": Setup(get_preset("small"), method="lora", micro_batch=2, seq_len=128, device="cpu"),
    "small-lora-ckpt": Setup(
        get_preset("small"), method="lora", micro_batch=2, seq_len=128, checkpointing=True, device="cpu"
    ),
    "small-accumulate": Setup(get_preset("small"), micro_batch=1, accum=2, seq_len=128, device="cpu"),
    "gpt2-pretrain": Setup(GPT2, micro_batch=2, seq_len=128, device="cpu"),
    "tiny-fsdp-2proc": Setup(get_preset("tiny"), micro_batch=4, seq_len=128, world=2, shard=3, device="cpu"),
    "small-ddp-2proc": Setup(get_preset("small"), micro_batch=2, seq_len=128, world=2, shard=0, device="cpu"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_predicted_peak_within_10_percent(name: str) -> None:
    s = SLOW_CASES[name]
    error = _check(s)
    print(f"{name}: predicted {memory(s).peak / 1e6:.2f} MB, predicted/measured - 1 = {error:+.4f}")
