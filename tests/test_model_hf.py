"""Hugging Face parity: tiny random `transformers` models of every supported family <-> lmforge.

For each family: HF -> lmforge logits equal (fp32, atol 1e-5); lmforge -> HF -> lmforge bit-identical and
HF loads our folder with the same logits; greedy decoding of 32 tokens equals `generate`. Then GQA ratios,
sharding, tokenizer files, and the error messages for bad checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lmforge.errors import ConfigError, DataError  # noqa: E402
from lmforge.model.config import PRESETS, get_preset  # noqa: E402
from lmforge.model.hf import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from lmforge.model.transformer import Transformer, build_model, generate_greedy  # noqa: E402

SMALL = {"vocab_size": 256, "max_position_embeddings": 128, "num_hidden_layers": 2, "intermediate_size": 96}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _hf_config(family: str, **kw: Any) -> Any:
    if family == "gpt2":  # GPT2Config defaults bos/eos to 50256: out of range for a 256-token vocabulary
        args = {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
        return transformers.GPT2Config(**(args | {"bos_token_id": 1, "eos_token_id": 1} | kw))
    common = SMALL | {"hidden_size": 64, "num_attention_heads": 4}
    if family == "llama":  # GQA 2, Llama-3 RoPE scaling, untied
        return transformers.LlamaConfig(
            **(common | {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE} | kw)
        )
    if family == "mistral":  # MQA with a sliding window shorter than the test sequence
        return transformers.MistralConfig(**(common | {"num_key_value_heads": 1, "sliding_window": 8} | kw))
    assert family == "qwen2"  # q/k/v bias, tied embeddings, MHA
    return transformers.Qwen2Config(**(common | {"num_key_value_heads": 4, "tie_word_embeddings": True} | kw))


FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def _hf_model(family: str, tmp_path: Path, **kw: Any) -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, **kw)).eval()
    path = tmp_path / f"hf-{family}"
    model.save_pretrained(path)
    return model, path


def _ids(B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_lmforge_logits_match(family: str, tmp_path: Path) -> None:
    hf, path = _hf_model(family, tmp_path)
    model, cfg = load_hf(path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert cfg.vocab_size == 256 and cfg.n_layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_lmforge_to_hf_to_lmforge_is_bit_identical(family: str, tmp_path: Path) -> None:
    _, path = _hf_model(family, tmp_path)
    model, cfg = load_hf(path)
    save_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [json.loads((path / "config.json").read_text())["architectures"][0]]
    again, cfg2 = load_hf(tmp_path / "out")
    assert cfg2 == cfg and _same_weights(model, again)
    # ... and transformers itself reads the folder, without trust_remote_code, to the same logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_transformers_generate(family: str, tmp_path: Path) -> None:
    hf, path = _hf_model(family, tmp_path)
    model, _ = load_hf(path)
    prompt = _ids(T=5, seed=1)
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(generate_greedy(model, prompt, 32), expected)


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1], ids=["mha", "gqa2", "gqa4", "mqa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gqa_ratios_and_tying_match_transformers(kv_heads: int, tied: bool, tmp_path: Path) -> None:
    hf, path = _hf_model(
        "llama", tmp_path, num_attention_heads=8, num_key_value_heads=kv_heads, tie_word_embeddings=tied
    )
    model, cfg = load_hf(path)
    assert (cfg.n_heads // cfg.kv_heads, cfg.tie_embeddings) == (8 // kv_heads, tied)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_save_loads_in_lmforge_and_transformers(tmp_path: Path) -> None:
    model = build_model(get_preset("tiny", vocab_size=256, max_seq_len=64, tie_embeddings=False))
    save_hf(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 4 and all((tmp_path / "sharded" / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    again, _ = load_hf(tmp_path / "sharded")
    assert _same_weights(model, again)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids(T=8)).logits, model(_ids(T=8)), atol=1e-5, rtol=0)


def test_hf_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf, _ = _hf_model("llama", tmp_path)
    hf.save_pretrained(tmp_path / "hf-sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "hf-sharded").glob("*.safetensors"))) > 1
    model, _ = load_hf(tmp_path / "hf-sharded")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, atol=1e-5, rtol=0)


def test_tokenizer_files_travel_and_set_special_ids(tmp_path: Path) -> None:
    from lmforge.tokenizer import train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog " * 20, "lorem ipsum dolor sit amet " * 20] * 10
    tok = train_tokenizer(texts, vocab_size=300)
    tok.save(tmp_path / "tok")
    cfg = get_preset("tiny", arch="gpt2", n_kv_heads=None, vocab_size=tok.vocab_size, max_seq_len=64)
    save_hf(build_model(cfg), tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # special tokens get ids 0.., eos first; <|im_end|> (id 4) ends a chat turn, so it is listed too
    assert (
        written["eos_token_id"] == [tok.encode(tok.eos_token)[0], tok.special_tokens["<|im_end|>"]] == [0, 4]
    )
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [0, 4]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("the lazy dog")["input_ids"] == tok.encode("the lazy dog")
    assert hf_tok.eos_token_id == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_the_hf_config_round_trip(name: str) -> None:
    cfg = get_preset(name)
    d = config_to_hf(cfg)
    assert config_from_hf(d) == cfg
    # The dict is a valid config for transformers' own class of that architecture.
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    assert hf_cfg.vocab_size == cfg.vocab_size


# ---------------------------------------------------------------------------------------------------------
# Errors name what is wrong.


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    with pytest.raises(ConfigError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "BertForMaskedLM" in msg
    assert all(
        a in msg for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
    )


def test_unsupported_feature_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        config_from_hf(_hf_config("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0}).to_dict())


def _rewrite_weights(path: Path, edit: Any) -> None:
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    _, path = _hf_model("llama", tmp_path)
    _rewrite_weights(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(DataError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(path)


def test_shape_mismatch_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    _, path = _hf_model("gpt2", tmp_path)

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 100)
        sd["transformer.h.0.extra.weight"] = torch.zeros(3)

    _rewrite_weights(path, edit)
    with pytest.raises(DataError) as e:
        load_hf(path)
    msg = str(e.value)
    assert "wrong shape: transformer.h.0.attn.c_attn.weight (64, 100) (expected (64, 192))" in msg
    assert "unexpected: transformer.h.0.extra.weight" in msg


def test_pickle_checkpoints_need_opt_in_and_load_weights_only(tmp_path: Path) -> None:
    hf, path = _hf_model("qwen2", tmp_path)
    sd = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(DataError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_hf(path)
    model, _ = load_hf(path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, atol=1e-5, rtol=0)


def test_load_in_bf16_casts_weights_and_keeps_rope_fp32(tmp_path: Path) -> None:
    _, path = _hf_model("llama", tmp_path)
    fp32, _ = load_hf(path)
    bf16, _ = load_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and bf16.rope_cos.dtype == torch.float32
    assert torch.equal(bf16.tok_embeddings.weight, fp32.tok_embeddings.weight.bfloat16())
    with torch.no_grad():
        torch.testing.assert_close(bf16(_ids()).float(), fp32(_ids()), atol=0.05, rtol=0)
