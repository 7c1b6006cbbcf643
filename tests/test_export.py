"""`lmforge export`: GGUF metadata/tensors read back, the llama.cpp RoPE permutation, HF and ONNX parity,
parity.json fields, and unsupported combinations refused before anything is written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import gpt2_cfg, llama_cfg, make_model_dir
from infer_helpers import make_tokenizer
from lmforge.cli import main as cli
from lmforge.errors import ConfigError
from lmforge.export.gguf import _permute, gguf_tensors, read_gguf, read_metadata, read_tensors, write_gguf
from lmforge.export.run import ExportConfig, _positional, run_export
from lmforge.model.config import RopeScaling
from lmforge.model.transformer import build_model, rope_tables, rotate_half
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


PARITY_KEYS = {
    "max_abs_logit_diff",
    "kl_mean",
    "kl_max",
    "greedy_agreement",
    "greedy_identical",
    "greedy_first_divergence",
    "perplexity_reference",
    "perplexity_export",
    "perplexity_rel_change",
    "perplexity_tokens",
    "prompts",
    "new_tokens",
}
QUICK = ["new_tokens=8", "prompts=[The quick brown fox, 'To be, or not to be']"]


def _export(src: Path, out: Path, fmt: str, *extra: str) -> dict:
    argv = [fmt, str(src), f"output={out}", *QUICK, *extra]
    from lmforge.config import load_config

    cfg = load_config(ExportConfig, None, _positional(argv))
    return run_export(cfg)


# ---------------------------------------------------------------------------------------------------------
# GGUF


def test_llama_permutation_turnsrotate_half_into_interleaved_pairs() -> None:
    """llama.cpp's `llama` graph rotates pairs (2i, 2i+1) by frequency i. After the q/k row permutation, that
    rotation of the permuted projection must equal the permuted rotate-half RoPE of the original one."""
    cfg = llama_cfg(n_heads=2, n_kv_heads=2, dim=32)  # head_dim 16
    hd, T = cfg.head_size, 7
    cos, sin = rope_tables(cfg)
    x = torch.randn(T, 2 * hd)  # two heads of q outputs at T positions
    ours = torch.cat([h * cos[:T] + rotate_half(h) * sin[:T] for h in x.split(hd, dim=-1)], dim=-1)
    perm = _permute(torch.eye(2 * hd), 2)  # rows permuted like the q weight: y' = P y
    xp = x @ perm.T
    theta = torch.arange(T)[:, None] * (1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    a, b = xp[:, 0::2].reshape(T, 2, hd // 2), xp[:, 1::2].reshape(T, 2, hd // 2)
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    inter = torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(T, 2 * hd)
    torch.testing.assert_close(inter, ours @ perm.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("family", "cfg"),
    [
        (
            "llama",
            llama_cfg(
                tie_embeddings=False,
                rope_theta=50000.0,
                rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32),
            ),
        ),
        ("qwen2", llama_cfg(qkv_bias=True, norm_eps=1e-6)),
        ("gpt2", gpt2_cfg()),
    ],
)
def test_gguf_reader_returns_metadata_and_tensors(tmp_path: Path, tok: Tokenizer, family: str, cfg) -> None:  # type: ignore[no-untyped-def]
    import gguf

    model = build_model(cfg, seed=3).eval()
    expected = {k: v.numpy() for k, v in gguf_tensors(model).items()}
    for qtype in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{qtype}.gguf"
        write_gguf(model, tok, path, qtype)
        reader = gguf.GGUFReader(str(path))
        meta = read_metadata(reader)
        got = read_tensors(reader)
        assert meta["general.architecture"] == family
        assert meta[f"{family}.context_length"] == 128
        assert meta[f"{family}.embedding_length"] == 64
        assert meta[f"{family}.block_count"] == 2
        assert meta[f"{family}.feed_forward_length"] == cfg.hidden_dim
        assert meta[f"{family}.attention.head_count"] == 4
        assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[qtype]
        if family == "gpt2":
            assert math.isclose(meta["gpt2.attention.layer_norm_epsilon"], 1e-5, rel_tol=1e-6)
            np.testing.assert_array_equal(
                got["output.weight"],
                expected["token_embd.weight"] if qtype == "f32" else got["output.weight"],
            )
        else:
            assert meta[f"{family}.attention.head_count_kv"] == 2
            assert math.isclose(meta[f"{family}.rope.freq_base"], cfg.rope_theta, rel_tol=1e-6)
            assert math.isclose(
                meta[f"{family}.attention.layer_norm_rms_epsilon"], cfg.norm_eps, rel_tol=1e-6
            )
            assert meta[f"{family}.rope.dimension_count"] == 16
        assert ("rope_freqs.weight" in got) == (cfg.rope_scaling is not None)
        assert ("output.weight" in got) == (family == "gpt2" or not cfg.tie_embeddings)
        # tokenizer
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.pre"] == "gpt-2"
        assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
        assert meta["tokenizer.ggml.token_type"][: len(tok.special_tokens)] == [3] * len(tok.special_tokens)
        assert set(meta["tokenizer.ggml.token_type"][len(tok.special_tokens) :]) == {1}
        assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(tok.backend.to_str())["model"]["merges"])
        assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (
            tok.bos_id,
            tok.eos_id,
        )
        assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_id
        assert meta["tokenizer.chat_template"] == tok.chat_template
        # tensors: exact in f32, fp16 rounding in f16, the Q8_0 bound per block of 32
        assert set(got) == set(expected)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        for name, ref in expected.items():
            if (
                qtype == "f32"
                or ref.ndim == 1
                or name == "position_embd.weight"
                or name == "rope_freqs.weight"
            ):
                assert types[name] == "F32", name
                np.testing.assert_array_equal(got[name], ref, err_msg=name)
            elif qtype == "f16":
                assert types[name] == "F16"
                np.testing.assert_array_equal(
                    got[name], ref.astype(np.float16).astype(np.float32), err_msg=name
                )
            else:
                assert types[name] == "Q8_0"
                blocks, err = ref.reshape(-1, 32), np.abs(got[name] - ref).reshape(-1, 32)
                amax = np.abs(blocks).max(axis=1, keepdims=True)
                # |x - q*d16| <= d/2 + 127 |d - d16|, d = amax/127, |d - d16| <= d * 2^-11
                assert (err <= amax / 127 * (0.5 + 127 * 2**-11) + 1e-12).all(), name
                assert err.max() > 0  # really quantized


def test_read_gguf_rebuilds_the_model(tmp_path: Path, tok: Tokenizer) -> None:
    cfg = llama_cfg(
        tie_embeddings=False, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16)
    )
    model = build_model(cfg, seed=5).eval()
    x = torch.randint(0, 512, (2, 100))
    for qtype, atol in (("f32", 0.0), ("f16", 5e-3), ("q8_0", 0.25)):  # init_std=0.1: large logits
        write_gguf(model, tok, tmp_path / "m.gguf", qtype)
        back, _ = read_gguf(tmp_path / "m.gguf")
        with torch.no_grad():
            diff = (back(x) - model(x)).abs().max().item()
        assert diff <= atol, (qtype, diff)


def test_gguf_export_parity_with_reader(tmp_path: Path, tok: Tokenizer) -> None:
    src = make_model_dir(tmp_path / "src", llama_cfg(), tok)
    r32 = _export(src, tmp_path / "f32", "gguf", "gguf_type=f32", "gguf_runtime=reader")
    assert r32["runtime"] == "gguf-reader+lmforge" and r32["tensor_types"] == ["F32"]
    p = r32["parity"]
    assert set(p) == PARITY_KEYS
    assert p["max_abs_logit_diff"] == 0.0 and p["greedy_agreement"] == 1.0 and p["greedy_identical"] == 2
    r8 = _export(src, tmp_path / "q8", "gguf", "gguf_type=q8_0", "gguf_runtime=reader")
    p = r8["parity"]
    assert r8["tensor_types"] == ["F32", "Q8_0"]
    assert 0 < p["max_abs_logit_diff"] < 0.2
    assert p["kl_mean"] < 1e-3 and p["kl_max"] < 1e-2
    assert p["greedy_agreement"] >= 0.9
    assert abs(p["perplexity_rel_change"]) < 0.01
    on_disk = json.loads((tmp_path / "q8" / "parity.json").read_text())
    assert on_disk["parity"] == p
    assert sorted(x.name for x in (tmp_path / "q8").iterdir()) == [
        "README.md",  # the model card
        "config.yaml",
        "model.gguf",
        "parity.json",
        "tokenizer",
    ]


# ---------------------------------------------------------------------------------------------------------
# HF and ONNX


def test_hf_export_loads_in_transformers(tmp_path: Path, tok: Tokenizer) -> None:
    import transformers

    src = make_model_dir(tmp_path / "src", llama_cfg(), tok)
    report = _export(src, tmp_path / "hf", "hf")
    p = report["parity"]
    assert report["runtime"] == "transformers"
    assert p["max_abs_logit_diff"] <= 1e-5 and p["kl_max"] < 1e-9
    assert p["greedy_agreement"] == 1.0 and p["greedy_identical"] == 2
    assert abs(p["perplexity_rel_change"]) < 1e-6
    assert report["tokenizer_match"] is True and report["chat_template_match"] is True
    out = tmp_path / "hf"
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tok.special_tokens["<|im_end|>"]  # a chat turn's end stops transformers.generate too
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        tok.bos_id,
        [tok.eos_id, im_end],
        tok.pad_id,
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)  # independently of the report
    assert type(hf).__name__ == "LlamaForCausalLM"


def test_onnx_export_matches_pytorch(tmp_path: Path, tok: Tokenizer) -> None:
    from lmforge.export.onnx import OnnxDecoder, OnnxRunner

    cfg = llama_cfg()
    src = make_model_dir(tmp_path / "src", cfg, tok)
    report = _export(src, tmp_path / "onnx", "onnx")
    p = report["parity"]
    assert report["runtime"] == "onnxruntime"
    assert p["max_abs_logit_diff"] <= 1e-4 and p["greedy_agreement"] == 1.0 and p["greedy_identical"] == 2
    assert abs(p["perplexity_rel_change"]) < 1e-5
    model = build_model(cfg, seed=1).eval()  # what make_model_dir saved
    run = OnnxRunner(tmp_path / "onnx" / "model.onnx")
    for shape in ((1, 1), (3, 17), (2, 128)):  # dynamic batch and sequence
        x = torch.randint(0, cfg.vocab_size, shape)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(run(x.numpy()), ref, atol=1e-4, rtol=0)
    # the KV-cache graph: prompt with an empty past, then one token at a time, against the model's logits
    assert report["decode_graph_greedy_identical"] == 2
    dec = OnnxDecoder(tmp_path / "onnx" / "model-decode.onnx", cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    empty = np.zeros((1, cfg.kv_heads, 0, cfg.head_size), dtype=np.float32)
    logits, past = dec.step(ids[0, :20].tolist(), [empty] * 2 * cfg.n_layers)
    steps = [logits]
    for t in range(20, 24):
        logits, past = dec.step([int(ids[0, t])], past)
        steps.append(logits)
    assert past[0].shape == (1, cfg.kv_heads, 24, cfg.head_size)
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Refusals and the command line


@pytest.mark.parametrize(
    ("fmt", "cfg", "extra", "message"),
    [
        ("gguf", llama_cfg(), ["gguf_type=q4_0"], "gguf_type='q4_0' is not supported"),
        ("gguf", llama_cfg(sliding_window=16), [], "sliding_window=16"),
        ("gguf", llama_cfg(qkv_bias=True, rope_scaling=RopeScaling()), [], "Llama-3 RoPE scaling"),
        ("tflite", llama_cfg(), [], "format"),
        ("hf", llama_cfg(qkv_bias=True, sliding_window=16), [], "q/k/v bias and a sliding window"),
    ],
)
def test_unsupported_combination_writes_nothing(
    tmp_path: Path,
    tok: Tokenizer,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    cfg,
    extra: list[str],
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    src = make_model_dir(tmp_path / "src", cfg, tok)
    out = tmp_path / "out"
    assert cli(["export", fmt, str(src), f"output={out}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no .partial


def test_quantized_source_is_refused(
    tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_model_dir(tmp_path / "src", llama_cfg(), tok)
    (src / "quant_config.json").write_text("{}")
    assert cli(["export", "onnx", str(src), f"output={tmp_path / 'out'}"]) == 2
    assert "quantized model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_positional_format_and_model() -> None:
    assert _positional(["gguf", "runs/x", "output=o", "-c", "a.yaml"]) == [
        "format=gguf",
        "model=runs/x",
        "output=o",
        "-c",
        "a.yaml",
    ]
    assert _positional(["-c", "a.yaml", "onnx"]) == ["-c", "a.yaml", "format=onnx"]
    with pytest.raises(ConfigError, match="format"):
        from lmforge.config import load_config

        load_config(ExportConfig, None, ["format=xyz", "model=m", "output=o"])


@pytest.mark.parametrize(
    ("fmt", "module", "extra"),
    [("hf", "transformers", "hf"), ("gguf", "gguf", "export"), ("onnx", "onnxruntime", "export")],
)
def test_missing_extra_names_the_install_and_writes_nothing(
    tmp_path: Path,
    tok: Tokenizer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    module: str,
    extra: str,
) -> None:
    """Without the format's optional package: one line naming the extra to install, exit 2, and neither the
    output nor a .partial folder is left behind (it used to be a ModuleNotFoundError traceback)."""
    src = make_model_dir(tmp_path / "src", llama_cfg(), tok)
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    assert cli(["export", fmt, str(src), f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'lmforge[{extra}]'" in err[0] and module in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
