"""Shared pieces of the inference / eval tests: a BPE tokenizer on real text and tiny random HF models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.tokenizer import Tokenizer, train_tokenizer
from tokenizer_corpus import shakespeare_docs

VOCAB = 512


def shakespeare_text(files: int = 2) -> list[str]:
    return [d["text"] for d in shakespeare_docs(files)]


def make_tokenizer() -> Tokenizer:
    return train_tokenizer(shakespeare_text(), vocab_size=VOCAB)


def hf_config(family: str, tok: Tokenizer, **kw: Any) -> Any:
    import transformers

    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids, **kw
        )
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        **ids,
    }
    if family == "llama":  # GQA
        return transformers.LlamaConfig(**common, num_key_value_heads=2, **kw)
    assert family == "mistral"  # a sliding window shorter than prompt + output: exercises the masks
    return transformers.MistralConfig(**common, num_key_value_heads=1, sliding_window=12, **kw)


def save_hf_model(family: str, tok: Tokenizer, path: Path, seed: int = 0) -> Any:
    """A random `transformers` model saved with the tokenizer files; returns the HF model (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tok)).eval()
    model.save_pretrained(path)
    tok.save(path)
    return model
