"""Shared pieces of the export tests: tiny lmforge model folders (random or briefly trained) with a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from infer_helpers import make_tokenizer, shakespeare_text
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import Tokenizer


def llama_cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = {
        "vocab_size": 512,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "hidden_dim": 128,
        "max_seq_len": 128,
        "init_std": 0.1,  # peaky logits: greedy choices are not coin flips between near-equal scores
    }
    return ModelConfig.model_validate(base | kw)


def gpt2_cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = {
        "arch": "gpt2",
        "vocab_size": 512,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "hidden_dim": 256,
        "max_seq_len": 128,
        "init_std": 0.1,
    }
    return ModelConfig.model_validate(base | kw)


def save_model_dir(model: Transformer, tok: Tokenizer, path: Path) -> Path:
    """An lmforge model folder: model_config.json + model.safetensors + tokenizer files."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")))
    tok.save(path)
    return path


def make_model_dir(path: Path, cfg: ModelConfig, tok: Tokenizer | None = None, seed: int = 1) -> Path:
    return save_model_dir(build_model(cfg, seed=seed).eval(), tok or make_tokenizer(), path)


def train_small(cfg: ModelConfig, tok: Tokenizer, steps: int = 150, seed: int = 0) -> Transformer:
    """A few hundred AdamW steps on Shakespeare: enough for confident, text-like greedy continuations."""
    torch.manual_seed(seed)
    ids = torch.tensor(tok.encode("\n".join(shakespeare_text(1))[:200_000]), dtype=torch.long)
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 64, 16
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,))
        x = torch.stack([ids[s : s + T] for s in starts])
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
