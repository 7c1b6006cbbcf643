"""GGUF exports run by llama.cpp itself (llama-cpp-python): same greedy tokens as lmforge, same tokenizer.

Slow: on the demo model (or a small Llama trained here when it is absent), exports f32, f16 and q8_0. Skipped when llama_cpp is not
importable (`pip install llama-cpp-python` builds llama.cpp with cmake, several minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export_helpers import gpt2_cfg, llama_cfg, make_model_dir, save_model_dir, train_small
from infer_helpers import make_tokenizer
from lmforge.config import load_config
from lmforge.export.run import ExportConfig, _positional, run_export
from lmforge.model.config import RopeScaling

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (pip install -c constraints.txt llama-cpp-python)"
)

PROMPTS = "prompts=[ROMEO. , 'To be, or not to be', 'KING. My lord,', 'The quick brown fox']"


def _export(src: Path, out: Path, qtype: str, *extra: str) -> dict:
    argv = ["gguf", str(src), f"output={out}", f"gguf_type={qtype}", "gguf_runtime=llama_cpp", *extra]
    return run_export(load_config(ExportConfig, None, _positional(argv)))


DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo" / "pretrain"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model when `make demo` has run, else a small Llama trained here (minutes on 2 busy cores)."""
    if (DEMO / "model" / "model.safetensors").is_file():
        return DEMO
    tok = make_tokenizer()
    cfg = llama_cfg(dim=128, n_layers=3, hidden_dim=352, max_seq_len=256, init_std=0.02)
    model = train_small(cfg, tok, steps=200)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("trained") / "model")


def test_llama_cpp_greedy_matches_lmforge(trained: Path, tmp_path: Path) -> None:
    r = _export(trained, tmp_path / "f32", "f32", PROMPTS, "new_tokens=32")
    p = r["parity"]
    assert r["runtime"] == "llama.cpp" and r["tokenizer_match"] is True
    assert p["greedy_identical"] == 4, p  # every prompt: the same 32 greedy tokens
    assert p["greedy_agreement"] == 1.0
    assert p["max_abs_logit_diff"] < 1e-4 and p["kl_max"] < 1e-8, p
    assert abs(p["perplexity_rel_change"]) < 1e-5, p
    # f16: llama.cpp also rounds activations to fp16 inside its matmuls. Measured: max |diff| ~3e-3, KL ~1e-7,
    # and one of the four free-running continuations of this briefly trained model hits a near-tie.
    r = _export(trained, tmp_path / "f16", "f16", PROMPTS, "new_tokens=32")
    p = r["parity"]
    assert p["greedy_identical"] >= 3 and p["greedy_agreement"] >= 0.98, p
    assert p["max_abs_logit_diff"] < 2e-2 and p["kl_max"] < 1e-4, p
    assert abs(p["perplexity_rel_change"]) < 1e-3, p
    r = _export(trained, tmp_path / "q8_0", "q8_0", PROMPTS, "new_tokens=32")
    p = r["parity"]
    assert p["greedy_agreement"] >= 0.95, p  # q8_0: top-1 agreement, teacher forced
    assert p["kl_mean"] < 2e-3 and abs(p["perplexity_rel_change"]) < 0.01, p


@pytest.mark.parametrize(
    "cfg",
    [
        gpt2_cfg(),
        llama_cfg(qkv_bias=True),  # -> qwen2
        llama_cfg(
            tie_embeddings=False, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16)
        ),
        llama_cfg(n_kv_heads=1, head_dim=32),  # MQA, head_dim != dim / n_heads: key_length metadata
    ],
    ids=["gpt2", "qwen2", "llama3-rope", "mqa-head-dim"],
)
def test_llama_cpp_runs_each_architecture(tmp_path: Path, cfg) -> None:  # type: ignore[no-untyped-def]
    src = make_model_dir(tmp_path / "src", cfg)
    p = _export(src, tmp_path / "out", "f32", "new_tokens=16")["parity"]
    assert p["max_abs_logit_diff"] < 2e-3, p
    assert p["greedy_agreement"] == 1.0, p
