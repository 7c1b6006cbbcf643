"""LoRA / QLoRA: frozen bases, parameter counts, merge, PEFT interop both ways, and `lmforge lora merge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from infer_helpers import VOCAB, make_tokenizer, save_hf_model
from lmforge.errors import ConfigError, DataError
from lmforge.model.hf import load_hf
from lmforge.model.lora import (
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    load_adapter_state_dict,
    lora_modules,
    merge_lora,
    save_adapter,
)
from lmforge.model.nf4 import NF4Linear
from lmforge.model.transformer import Transformer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    save_hf_model("llama", tok, path)
    return path


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: v.clone() for k, v in sd.items() if ".lora_" not in k}


# -- counts, init, scale, targets ----------------------------------------------------------------------


def test_trainable_count_matches_closed_form(llama_dir: Path) -> None:
    model, cfg = load_hf(llama_dir)
    n_base = sum(p.numel() for p in model.parameters())
    lcfg = LoraConfig(rank=4, alpha=8)
    stats = apply_lora(model, lcfg)
    d, hd, kv, h = cfg.dim, cfg.head_size, cfg.kv_heads, cfg.hidden_dim
    shapes = [
        (d, h * 0 + cfg.n_heads * hd),
        (d, kv * hd),
        (d, kv * hd),
        (cfg.n_heads * hd, d),
        (d, h),
        (d, h),
        (h, d),
    ]
    expected = cfg.n_layers * sum(4 * (i + o) for i, o in shapes)
    assert stats["trainable"] == expected == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert stats["total"] == n_base + expected
    assert stats["fraction"] == pytest.approx(expected / (n_base + expected), rel=1e-12)
    assert len(lora_modules(model)) == 7 * cfg.n_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert not model.tok_embeddings.weight.requires_grad and not model.norm.weight.requires_grad


def test_qlora_counts_nf4_weights_and_quantizes_targets(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    n_base = sum(p.numel() for p in model.parameters())
    stats = apply_lora(model, LoraConfig(rank=2, targets=["mlp.*"]), quantize_base=True)
    assert stats["total"] == n_base + stats["trainable"]
    assert stats["trainable"] == 2 * 2 * (3 * (64 + 128))
    mods = lora_modules(model)
    assert sorted(mods) == [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("down", "gate", "up")]
    assert all(isinstance(m.base, NF4Linear) for m in mods.values())
    assert isinstance(model.layers[0].attn.q, nn.Linear)  # untargeted: untouched


def test_zero_init_adapter_is_exactly_the_base(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    base = _logits(model)
    apply_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.1))
    model.train()  # dropout active: still exact, since B = 0
    m = next(iter(lora_modules(model).values()))
    assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) and m.lora_A.abs().sum() > 0
    bound = 1 / m.in_features**0.5  # Kaiming uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert float(m.lora_A.detach().abs().max()) <= bound
    assert torch.equal(_logits(model), base)


def test_rslora_scale_and_delta() -> None:
    assert LoraConfig(rank=16, alpha=8).scale == 0.5
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == 2.0
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    lora = LoraLinear(base, rank=16, scale=LoraConfig(rank=16, alpha=8, rslora=True).scale)
    lora.reset_parameters()
    nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 32)
    delta = lora(x) - base(x)
    torch.testing.assert_close(delta, 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T), rtol=0, atol=1e-5)
    torch.testing.assert_close(lora.delta_weight(), 2.0 * lora.lora_B @ lora.lora_A)


def test_bad_target_lists_valid_names(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    with pytest.raises(ConfigError) as e:
        apply_lora(model, LoraConfig(targets=["attn.q", "attn.qq", "mlp.gate_proj"]))
    msg = str(e.value)
    assert "['attn.qq', 'mlp.gate_proj']" in msg
    assert (
        "valid names (matched at the end, fnmatch patterns allowed): attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down ("
        in msg
    )
    assert "output" not in msg.split("valid names")[1]  # the LM head is not adaptable
    assert not lora_modules(model)  # nothing half-applied
    apply_lora(model, LoraConfig(targets=["layers.1.*"]))
    assert sorted(lora_modules(model)) == sorted(f"layers.1.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))  # fmt: skip
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


# -- training leaves the base untouched ----------------------------------------------------------------


@pytest.mark.parametrize("quantize_base", [False, True])
def test_base_bit_identical_after_training(llama_dir: Path, quantize_base: bool) -> None:
    from lmforge.train.objectives import causal_lm

    model, _ = load_hf(llama_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8), quantize_base=quantize_base)
    before = _base_tensors(model)
    if quantize_base:
        assert any(k.endswith(".base.packed") for k in before) and not any(
            k.endswith(".base.weight") for k in before
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    batch = {"input_ids": IDS[:, :-1], "labels": IDS[:, 1:]}
    losses = []
    for _ in range(4):
        loss_sum, n = causal_lm(model, batch)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert losses[-1] < losses[0] - 0.05  # the adapters did learn
    assert all(float(m.lora_B.abs().sum()) > 0 for m in lora_modules(model).values())


# -- merge, disable, adapter state -------------------------------------------------------------------


def test_merge_equals_adapter_forward(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["attn.*", "mlp.*"]))
    _randomize_b(model)
    lora = _logits(model)
    merge_lora(model)
    assert not lora_modules(model) and isinstance(model.layers[1].mlp.down, nn.Linear)
    assert float((_logits(model) - lora).abs().max()) < 1e-5


def test_qlora_merge_is_dequantized_base_plus_delta_exactly(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8), quantize_base=True)
    _randomize_b(model)
    q = model.layers[0].attn.q
    assert isinstance(q, LoraLinear) and isinstance(q.base, NF4Linear)
    expected = q.base.dequantized_weight() + q.delta_weight()
    lora = _logits(model)
    merge_lora(model)
    assert torch.equal(model.layers[0].attn.q.weight, expected)
    assert float((_logits(model) - lora).abs().max()) < 1e-5


def test_adapters_disabled_gives_base_logits(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    base = _logits(model)
    apply_lora(model, LoraConfig(rank=4))
    _randomize_b(model)
    lora = _logits(model)
    assert float((lora - base).abs().max()) > 1e-2
    with adapters_disabled(model):
        assert torch.equal(_logits(model), base)
    assert torch.equal(_logits(model), lora)


def test_adapter_state_dict_round_trip_and_strict(llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    apply_lora(model, LoraConfig(rank=4, targets=["attn.q", "attn.v"]))
    _randomize_b(model)
    sd = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert sorted(sd) == sorted(
        f"layers.{i}.attn.{p}.lora_{ab}" for i in range(2) for p in "qv" for ab in "AB"
    )
    other, _ = load_hf(llama_dir)
    apply_lora(other, LoraConfig(rank=4, targets=["attn.q", "attn.v"]), seed=7)
    load_adapter_state_dict(other, sd)
    assert torch.equal(_logits(other), _logits(model))
    bad = dict(sd)
    del bad["layers.0.attn.q.lora_A"]
    bad["layers.0.attn.k.lora_A"] = sd["layers.0.attn.v.lora_A"]
    with pytest.raises(
        DataError, match=r"missing: layers\.0\.attn\.q\.lora_A; unexpected: layers\.0\.attn\.k\.lora_A"
    ):
        load_adapter_state_dict(other, bad)


# -- PEFT format ---------------------------------------------------------------------------------------


def _hf_dir(family: str, tok: Any, path: Path) -> Path:
    if family == "qwen2":
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=128, max_position_embeddings=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        )  # fmt: skip
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save(path)
    else:
        save_hf_model(family, tok, path)
    return path


@pytest.mark.parametrize(
    ("family", "targets", "rslora"),
    [
        ("llama", ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"], False),
        pytest.param("llama", ["attn.q", "layers.1.mlp.down"], True, marks=pytest.mark.slow),
        pytest.param("mistral", ["attn.*", "mlp.*"], False, marks=pytest.mark.slow),
        ("qwen2", ["attn.q", "attn.v", "mlp.up"], False),
        ("gpt2", ["attn.o", "mlp.up", "mlp.down"], False),
    ],
)
def test_peft_loads_our_adapter(
    tmp_path: Path, tok: Any, family: str, targets: list[str], rslora: bool
) -> None:
    hf_dir = _hf_dir(family, tok, tmp_path / family)
    model, _ = load_hf(hf_dir)
    lcfg = LoraConfig(rank=4, alpha=12, targets=targets, rslora=rslora)
    apply_lora(model, lcfg)
    _randomize_b(model)
    save_adapter(model, lcfg, tmp_path / "adapter", base_model=str(hf_dir))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (4, 12.0, rslora)
    assert conf["fan_in_fan_out"] is (family == "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = _logits(model)
    assert float((_logits(peft_model) - ours).abs().max()) < 1e-5
    with adapters_disabled(model):
        assert float((_logits(model) - ours).abs().max()) > 1e-3  # the adapter is not a no-op
    # and back: our loader on a fresh base gives the same model and config
    fresh, _ = load_hf(hf_dir)
    back = load_adapter(fresh, tmp_path / "adapter")
    assert (back.rank, back.alpha, back.rslora, back.scale) == (4, 12.0, rslora, lcfg.scale)
    assert torch.equal(_logits(fresh), ours)


def test_peft_target_module_names(tmp_path: Path, llama_dir: Path) -> None:
    model, _ = load_hf(llama_dir)
    lcfg = LoraConfig(rank=2, targets=["attn.q", "mlp.down"])
    apply_lora(model, lcfg)
    save_adapter(model, lcfg, tmp_path / "a", base_model="base")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj",
        "q_proj",
    ]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys[:2] == ["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]  # fmt: skip
    assert len(keys) == 8


def test_we_load_peft_saved_adapter(tmp_path: Path, llama_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
    )
    pm = peft.get_peft_model(hf, pcfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    pm.save_pretrained(tmp_path / "peft")
    model, _ = load_hf(llama_dir)
    cfg = load_adapter(model, tmp_path / "peft")
    assert (cfg.rank, cfg.alpha, cfg.targets) == (4, 8.0, ["attn.q", "attn.v", "mlp.up"])
    assert float((_logits(model) - _logits(pm.eval())).abs().max()) < 1e-5


def test_gpt2_fused_qkv_is_refused(tmp_path: Path, tok: Any) -> None:
    hf_dir = _hf_dir("gpt2", tok, tmp_path / "gpt2")
    model, _ = load_hf(hf_dir)
    apply_lora(model, LoraConfig(rank=2, targets=["attn.q", "attn.o"]))
    with pytest.raises(ConfigError, match="c_attn"):
        save_adapter(model, LoraConfig(rank=2, targets=["attn.q", "attn.o"]), tmp_path / "a", base_model="x")


# -- lmforge lora merge --------------------------------------------------------------------------------


def _finetune_like_run(run: Path, base: Path, tok: Any, method: str) -> Transformer:
    """What `lmforge finetune` leaves: <run>/adapter/ with the PEFT files, lmforge_base.json, tokenizer."""
    model, _ = load_hf(base)
    lcfg = LoraConfig(rank=4, alpha=8, dropout=0.1)  # the merge's parity check must not apply dropout
    apply_lora(model, lcfg, quantize_base=method == "qlora")
    _randomize_b(model)
    model.eval()
    save_adapter(model, lcfg, run / "adapter", base_model=str(base))
    (run / "adapter" / "lmforge_base.json").write_text(json.dumps({"base": str(base), "method": method}))
    tok.save(run / "adapter")
    return model


def test_lora_merge_command(tmp_path: Path, llama_dir: Path, tok: Any) -> None:
    from lmforge.cli import main as cli

    model = _finetune_like_run(tmp_path / "run", llama_dir, tok, "lora")
    out = tmp_path / "merged"
    assert cli(["lora", "merge", f"adapter={tmp_path / 'run'}", f"output={out}"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "merge_report.json", "manifest.json"):  # fmt: skip
        assert (out / name).is_file(), name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merged_modules"] == 14 and report["nf4_base"] is False
    assert report["parity_max_abs_logit_diff_fp32"] < 1e-5
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert float((_logits(merged_hf) - _logits(model)).abs().max()) < 1e-5
    # an existing output is not overwritten without asking
    assert cli(["lora", "merge", f"adapter={tmp_path / 'run'}", f"output={out}"]) != 0


def test_lora_merge_qlora_adapter_onto_nf4_base(tmp_path: Path, llama_dir: Path, tok: Any) -> None:
    from lmforge.train.lora_merge import CONFIG, merge

    model = _finetune_like_run(tmp_path / "run", llama_dir, tok, "qlora")
    q = model.layers[1].mlp.down
    assert isinstance(q, LoraLinear) and isinstance(q.base, NF4Linear)
    expected = q.base.dequantized_weight() + q.delta_weight()
    report = merge(CONFIG(adapter=str(tmp_path / "run" / "adapter"), output=str(tmp_path / "m")))
    assert report["nf4_base"] is True
    merged, _ = load_hf(tmp_path / "m")
    assert torch.equal(merged.layers[1].mlp.down.weight, expected)
    assert float((_logits(merged) - _logits(model)).abs().max()) < 1e-5


def test_lora_merge_errors(tmp_path: Path, llama_dir: Path) -> None:
    from lmforge.train.lora_merge import CONFIG, merge

    with pytest.raises(DataError, match=r"no adapter_config\.json"):
        merge(CONFIG(adapter=str(tmp_path), output=str(tmp_path / "o")))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny"}))  # fmt: skip
    with pytest.raises(ConfigError, match="tiny is not a folder"):
        merge(CONFIG(adapter=str(tmp_path / "a"), output=str(tmp_path / "o")))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))  # fmt: skip
    with pytest.raises(DataError, match="use_dora=True is not supported"):
        merge(CONFIG(adapter=str(tmp_path / "a"), base=str(llama_dir), output=str(tmp_path / "o")))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_run_then_merge(tmp_path: Path, llama_dir: Path, method: str) -> None:
    """The real `lmforge finetune` writes the adapter; `lmforge lora merge` turns the run into a model."""
    from lmforge.cli import main as cli

    lines = [json.dumps({"prompt": f"count {i}", "completion": f"{i + 1}"}) for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = [f"base={llama_dir}", f"method={method}", "max_steps=3", f"output={run}", "optim.lr=1e-2"]
    args += [
        "seq_len=32",
        "global_batch=8",
        "micro_batch=8",
        "threads=1",
        "progress=false",
        "tensorboard=false",
    ]
    assert cli(["finetune", *args, f"data.train={tmp_path / 'train.jsonl'}", "data.val_fraction=0.1"]) == 0
    assert cli(["lora", "merge", f"adapter={run}", f"output={tmp_path / 'merged'}"]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["nf4_base"] is (method == "qlora") and report["merged_modules"] == 14
    adapted, _ = load_hf(llama_dir)
    load_adapter(adapted, run / "adapter", quantize_base=method == "qlora")
    with adapters_disabled(adapted):
        base = _logits(adapted)
    ours = _logits(adapted)
    assert float((ours - base).abs().max()) > 1e-4  # training moved the adapter
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert float((_logits(merged) - ours).abs().max()) < 1e-5
