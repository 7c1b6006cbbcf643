"""The decoder itself: init, KV cache vs full forward, GQA fallback, tying, positions, compile, limits."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import lmforge.model.transformer as tr
from lmforge.model.config import ModelConfig, get_preset
from lmforge.model.transformer import KVCache, build_model, generate_greedy

LLAMA = get_preset("tiny", vocab_size=256, max_seq_len=64)
GPT2 = get_preset("tiny", arch="gpt2", n_kv_heads=None, vocab_size=256, max_seq_len=64)
WINDOW = get_preset("tiny", vocab_size=256, max_seq_len=64, sliding_window=8, n_kv_heads=1)
QWEN = get_preset("tiny", vocab_size=256, max_seq_len=64, qkv_bias=True, tie_embeddings=False)


def _ids(cfg: ModelConfig, B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_init_weights_follows_the_documented_scheme() -> None:
    cfg = get_preset("small")
    model = build_model(cfg, seed=0)
    std = cfg.init_std
    resid = std / math.sqrt(2 * cfg.n_layers)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(std, rel=0.01)
    assert model.layers[0].attn.q.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.layers[3].attn.o.weight.std().item() == pytest.approx(resid, rel=0.02)
    assert model.layers[5].mlp.down.weight.std().item() == pytest.approx(resid, rel=0.02)
    assert torch.equal(model.layers[2].mlp_norm.weight, torch.ones(cfg.dim))
    gpt2 = build_model(GPT2)
    assert torch.count_nonzero(gpt2.layers[0].attn.q.bias).item() == 0
    assert torch.equal(gpt2.norm.bias, torch.zeros(GPT2.dim))


def test_seed_makes_init_reproducible() -> None:
    a, b, c = build_model(LLAMA, seed=1), build_model(LLAMA, seed=1), build_model(LLAMA, seed=2)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


def test_embedding_parameters_are_named_embed_and_blocks_are_layers() -> None:
    names = [n for n, _ in build_model(GPT2).named_parameters() if "embed" in n]
    assert names == ["tok_embeddings.weight", "pos_embeddings.weight"]
    model = build_model(LLAMA)
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == LLAMA.n_layers


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, WINDOW, QWEN], ids=["llama-gqa", "gpt2", "sliding-mqa", "qwen"])
@pytest.mark.parametrize("static", [False, True], ids=["filled-slots", "static"])
def test_kv_cache_decoding_equals_full_forward_at_every_position(cfg: ModelConfig, static: bool) -> None:
    model = build_model(cfg)
    model.fuse_projections()  # llama: q;k;v and gate;up as one matmul each under no_grad
    ids = _ids(cfg)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(cfg, batch_size=2, max_len=32, static=static)
        parts = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:11], kv_cache=cache)]  # chunked prefill
        parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(11, ids.shape[1])]  # one at a time
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_sliding_window_changes_only_positions_beyond_the_window() -> None:
    windowed = build_model(WINDOW)
    full_attn = build_model(WINDOW.model_copy(update={"sliding_window": None}))
    ids = _ids(WINDOW)
    with torch.no_grad():
        a, b = windowed(ids), full_attn(ids)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax().item() > 1e-3


def test_explicit_position_ids_equal_the_default() -> None:
    for cfg in (LLAMA, GPT2):
        model = build_model(cfg)
        ids = _ids(cfg)
        pos = torch.arange(ids.shape[1]).expand(2, -1)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, position_ids=pos), model(ids), atol=1e-6, rtol=0)


def test_gqa_without_enable_gqa_gives_the_same_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.5 path: k/v heads repeated by hand."""
    model = build_model(get_preset("tiny", vocab_size=256, n_heads=8, n_kv_heads=2, max_seq_len=64))
    ids = _ids(LLAMA)
    with torch.no_grad():
        fast = model(ids)
        monkeypatch.setattr(tr, "_SDPA_GQA", False)
        slow = model(ids)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_tied_head_is_the_embedding_and_untied_is_separate() -> None:
    tied, untied = build_model(LLAMA), build_model(QWEN)
    assert tied.output is None and untied.output is not None
    assert (
        len(list(tied.parameters())) == len(list(untied.parameters())) - 1 - 3 * QWEN.n_layers
    )  # head, q/k/v biases
    tied(_ids(LLAMA)).sum().backward()
    grad = tied.tok_embeddings.weight.grad
    assert grad is not None
    unused = torch.ones(LLAMA.vocab_size, dtype=torch.bool)
    unused[_ids(LLAMA).flatten()] = False
    # Rows of tokens that never appear in the input still get gradient: through the output head.
    assert grad[unused].abs().sum().item() > 0


def test_logits_come_in_the_model_dtype() -> None:
    model = build_model(LLAMA, dtype=torch.bfloat16)
    assert model(_ids(LLAMA, T=4)).dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32


def test_too_long_input_is_refused() -> None:
    model = build_model(LLAMA)
    with pytest.raises(ValueError, match="exceeds the limit of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache.empty(LLAMA, 1, max_len=8)
    with pytest.raises(ValueError, match="limit of 8"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_greedy_generation_equals_argmax_of_full_forward() -> None:
    model = build_model(LLAMA)
    out = generate_greedy(model, _ids(LLAMA, T=4), 12)
    with torch.no_grad():
        logits = model(out)
    assert out.shape == (2, 16)
    assert torch.equal(logits[:, 3:-1].argmax(-1), out[:, 4:])


@pytest.mark.slow
def test_torch_compile_gives_the_same_logits() -> None:
    model = build_model(LLAMA)
    ids = _ids(LLAMA)
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model)(ids)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_fused_projections_give_the_same_logits_and_stay_out_of_training() -> None:
    """The merged matmuls give bit-identical logits; with autograd on (training) the separate Linears run,
    so gradients reach every parameter; a swapped-out Linear turns its block's fusion off."""
    model = build_model(LLAMA, seed=1)
    ids = _ids(LLAMA)
    with torch.no_grad():
        before = model(ids, last_only=True)
        assert model.fuse_projections()
        assert torch.equal(model(ids, last_only=True), before)
        torch.testing.assert_close(model(ids)[:, -1:], before, atol=1e-6, rtol=0)  # head over B*T rows
    model(ids).sum().backward()
    attn: Any = model.layers[0].attn
    assert attn.q.weight.grad is not None and attn.v.weight.grad is not None
    attn.k = torch.nn.Linear(LLAMA.dim, attn.k.out_features, bias=False)  # as quantization / LoRA do
    assert not attn.fused.holds((attn.q, attn.k, attn.v))


def test_a_linear_swapped_in_any_block_turns_the_fusion_off_for_the_next_forward() -> None:
    """The fusion is checked once per forward, for every block: a Linear swapped in the last block (as
    quantization / LoRA do) is what that forward multiplies by, as in an unfused copy of the model."""
    model = build_model(LLAMA, seed=1)
    assert model.fuse_projections()
    mlp: Any = model.layers[-1].mlp
    mlp.up = torch.nn.Linear(LLAMA.dim, LLAMA.hidden_dim, bias=False)
    ids = _ids(LLAMA)
    unfused = copy.deepcopy(model)
    assert unfused.fusion is None and unfused.layers[-1].attn.fused is None
    with torch.no_grad():
        assert torch.equal(model(ids), unfused(ids))
