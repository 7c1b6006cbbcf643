"""`lmforge plan`: the memory model against the ZeRO paper and our autograd graph, the strategy, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.model.config import ModelConfig, get_preset, num_params
from lmforge.model.transformer import build_model
from lmforge.plan.memory import Setup, block_activation_elems, memory, zero_memory
from lmforge.plan.run import EXIT_DOES_NOT_FIT, DoesNotFit, PlanConfig, plan
from lmforge.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_zero_paper_figures() -> None:
    """ZeRO (Rajbhandari et al. 2020), Figure 1: 7.5B parameters, 64 devices, mixed-precision Adam (2+2+12)."""
    got = [round(zero_memory(7.5e9, stage, 64)["total"] / 1e9, 1) for stage in range(4)]
    assert got == [120.0, 31.4, 16.6, 1.9]


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("tiny"),
        ModelConfig(
            arch="gpt2", vocab_size=512, dim=96, n_layers=2, n_heads=3, hidden_dim=384, max_seq_len=64
        ),
    ],
    ids=["llama", "gpt2"],
)
def test_block_activations_are_what_autograd_saves(cfg: ModelConfig) -> None:
    """The per-block formula equals the bytes of the distinct storages autograd saves for one block."""
    model = build_model(cfg)
    B, T = 2, 32
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = model.tok_embeddings(torch.randint(0, cfg.vocab_size, (B, T)))
    cos = sin = None
    if cfg.arch == "llama":
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin)
    fp32, act = block_activation_elems(cfg)
    assert sum(saved.values()) == (fp32 + act) * 4 * B * T


def test_memory_breakdown_of_a_small_pretrain_run() -> None:
    cfg = get_preset("small")
    n = num_params(cfg)
    m = memory(Setup(cfg, micro_batch=4, seq_len=256, device="cpu"))
    assert m.weights == m.gradients == 4 * n and m.optimizer == 8 * n
    assert m.logits == 3 * 4 * cfg.vocab_size * 4 * 256
    assert m.activations_ckpt < m.activations_no_ckpt / 5
    # accumulation keeps the gradients alive under the next micro batch's activations
    m2 = memory(Setup(cfg, micro_batch=2, accum=2, seq_len=256, device="cpu"))
    assert m2.rollback == 12 * n  # the loop's copy of weights + Adam state (nonfinite_rollback)
    assert m2.peak == pytest.approx(12 * n + m2.rollback + 4 * n + m2.activations + m2.logits)


def test_scenarios_from_the_shipped_configs() -> None:
    def run(name: str) -> dict:
        cfg = load_config(PlanConfig, ROOT / "configs/plan" / name, command="plan")
        return plan(cfg)

    p = run("llama-1.1b-24gb.yaml")  # full pretraining on one 24 GB card: fits only with checkpointing
    assert p["strategy"]["activation_checkpointing"] is True and p["strategy"]["optimizer"] == "adamw"
    assert p["memory_bytes"]["device_total"] <= p["hardware"]["memory_bytes"]
    assert p["strategy"]["global_batch"] * 2048 == 524288
    p = run("mistral-7b-qlora-24gb.yaml")
    assert 3.5 < p["memory_gib"]["weights"] < 5.5  # 7.2B mostly at 4.5 bits + bf16 embeddings
    p = run("llama-100b-lora-8xh100.yaml")
    assert 99e9 < p["params"] < 101e9
    assert p["strategy"]["sharding"] == "zero3" and p["strategy"]["dist_strategy"] == "fsdp"
    assert p["overlay"]["unsupported"] or p["overlay"]["config"]["command"] == "finetune"
    p = run("llama-100b-pretrain-cluster.yaml")
    assert p["strategy"]["devices"] == 1024 and p["strategy"]["sharding"] == "zero3"
    b = p["budget"]
    assert b["tokens"] == pytest.approx(20 * p["params"])
    assert b["cost"] == pytest.approx(b["device_hours"] * 2.5)
    assert b["hours"] == pytest.approx(b["tokens"] / p["speed"]["tokens_per_s"] / 3600)


def test_planning_takes_under_a_second() -> None:
    cfg = load_config(PlanConfig, ROOT / "configs/plan/llama-100b-pretrain-cluster.yaml", command="plan")
    plan(cfg)  # imports
    t0 = time.perf_counter()
    plan(cfg)
    assert time.perf_counter() - t0 < 1.0


def test_impossible_request_says_how_much_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = PlanConfig(
        model="mistral-7b", method="full", hardware="rtx-4090", seq_len=2048, global_batch_tokens=2048
    )
    with pytest.raises(DoesNotFit) as e:
        plan(cfg)
    msg = str(e.value)
    assert "does not fit" in msg and "GiB short per device" in msg
    # 7.24B x (4 fp32 weights + 4 grads + 2 8-bit moments) alone is 67 GiB > 24 GiB
    short = float(msg.split(": ")[-1].split(" GiB short")[0])
    assert short > 67.4 - 24.0
    assert "4 x rtx-4090" in msg or "x rtx-4090 with ZeRO-3" in msg
    assert (
        main(["plan", "mistral-7b", "method=full", "hardware=rtx-4090", "seq_len=2048"]) == EXIT_DOES_NOT_FIT
    )


def test_json_output_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "small", "hardware=a100-80gb", "seq_len=1024", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert set(p) >= {
        "model",
        "params",
        "strategy",
        "why",
        "memory_bytes",
        "speed",
        "budget",
        "overlay",
        "fits",
    }
    assert set(p["strategy"]) >= {
        "micro_batch",
        "gradient_accumulation",
        "global_batch",
        "activation_checkpointing",
        "sharding",
        "cpu_offload",
        "optimizer",
        "precision",
    }
    assert set(p["why"]) == {
        "micro_batch",
        "gradient_accumulation",
        "activation_checkpointing",
        "sharding",
        "cpu_offload",
        "nonfinite_rollback",
        "optimizer",
        "precision",
    }
    mem = p["memory_bytes"]
    for key in ("weights", "gradients", "optimizer", "activations", "activations_ckpt", "logits", "peak"):
        assert isinstance(mem[key], float) and mem[key] >= 0
    assert (
        p["strategy"]["micro_batch"] * p["strategy"]["gradient_accumulation"] == p["strategy"]["global_batch"]
    )
    assert 0 < p["speed"]["mfu"] <= 0.45
    assert p["zero_stages_gb"]["stage_0"] == pytest.approx(16 * p["params"] / 1e9)


def test_overlay_loads_as_a_pretrain_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.yaml"
    args = ["plan", "small", "hardware=h100", "devices_per_node=4", "seq_len=512", f"overlay={out}"]
    assert main([*args, "global_batch_tokens=65536", "sharding=zero3", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert out.read_text().startswith("# lmforge pretrain -c")
    cfg = load_config(PretrainConfig, out, ["data=tokens", "output=run"], command="pretrain")
    assert cfg.micro_batch == p["strategy"]["micro_batch"]
    assert cfg.global_batch == 128 and cfg.seq_len == 512 and cfg.model == "small"
    assert cfg.dist.strategy == "fsdp" and cfg.dist.reshard_after_forward is True
    assert cfg.activation_checkpointing == p["strategy"]["activation_checkpointing"]
    assert cfg.precision == "bf16"
