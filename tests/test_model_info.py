"""`lmforge model info`: numbers for presets, HF folders and YAML files, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.model.config import get_preset
from lmforge.model.hf import config_to_hf
from lmforge.model.info import model_info
from lmforge.model.source import model_config


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["model", "info", *args, "format=json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_preset_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    info = _run_json(capsys, "llama-3.2-1b", "seq_len=2048")
    p = info["params"]
    assert p["total"] == 1_235_814_400
    assert p["embedding"] == 128256 * 2048
    assert p["non_embedding"] == p["total"] - p["embedding"]
    assert info["shapes"]["layers.0.attn.k.weight"] == [512, 2048]  # 8 kv heads x 64
    assert "layers.1.attn.k.weight" not in info["shapes"]
    assert info["flops_per_token"]["train"] == 6 * p["matmul"] + 12 * 16 * 32 * 64 * 2048
    assert info["weights_gib"]["bf16"] == pytest.approx(1_235_814_400 * 2 / 1024**3)
    assert info["weights_gib"]["4-bit"] == pytest.approx(info["weights_gib"]["fp32"] / 8)
    assert info["adamw_state_gib"]["fp32"] == pytest.approx(1_235_814_400 * 16 / 1024**3)


def test_hf_folder_yaml_file_and_run_folder_give_the_same_config(tmp_path: Path) -> None:
    cfg = get_preset("qwen2.5-0.5b")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(
        yaml.safe_dump({"model": cfg.model_dump(mode="json"), "lr": 1})
    )
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for spec in ("qwen2.5-0.5b", tmp_path / "hf", tmp_path / "run", tmp_path / "m.yaml"):
        assert model_config(str(spec)) == cfg


def test_activation_estimate_scales_with_tokens() -> None:
    cfg = get_preset("small")
    a = model_info(cfg, seq_len=256, batch_size=1)["activations_gib"]
    b = model_info(cfg, seq_len=256, batch_size=4)["activations_gib"]
    assert b["fp32"] == pytest.approx(4 * a["fp32"]) and a["bf16"] == pytest.approx(a["fp32"] / 2)


def test_tables_print_and_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["model", "info", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "transformer" not in out and "pos_embeddings.weight" in out
    assert main(["model", "info", "gpt2-1t"]) == 2
    err = capsys.readouterr().err
    assert "gpt2-1t" in err and "gpt2-124m" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    assert main(["model", "info", str(tmp_path)]) == 2
    assert "supported: LlamaForCausalLM" in capsys.readouterr().err
