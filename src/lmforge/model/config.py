"""The model's shape: `ModelConfig`, named sizes as small functions, parameter and FLOP counts.

    from lmforge.model.config import get_preset, num_params, flops_per_token
    cfg = get_preset("small")                      # ~10M Llama for CPU demos
    num_params(cfg), flops_per_token(cfg, seq_len=256)

    lmforge model info llama-3.2-1b                # the same numbers from the command line

Two families share one decoder (see transformer.py):
  llama: RMSNorm, RoPE (theta + optional Llama-3 scaling), MHA/GQA/MQA, SwiGLU, optional q/k/v bias (Qwen2)
  gpt2:  LayerNorm, learned positions, GELU (tanh), biases everywhere, fused-qkv in HF checkpoints
Presets for public families (Llama-3.2-1B, Qwen2.5-0.5B, Mistral-7B, GPT-2 sizes) give the shapes only,
never weights; load weights with `lmforge.model.hf.load_hf`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from lmforge.config import Section
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json


class RopeScaling(Section):
    """Llama-3 RoPE frequency scaling (HF `rope_type: llama3`): long wavelengths are slowed by `factor`."""

    factor: float = Field(8.0, gt=0, description="divide low frequencies by this factor")
    low_freq_factor: float = Field(
        1.0, gt=0, description="wavelengths above original/low_freq_factor are scaled"
    )
    high_freq_factor: float = Field(
        4.0, gt=0, description="wavelengths below original/high_freq_factor are kept"
    )
    original_max_position_embeddings: int = Field(
        8192, gt=0, description="context length of the unscaled model"
    )


class ModelConfig(Section):
    """Everything needed to build the decoder; serialises to YAML/JSON and embeds in training configs."""

    arch: Literal["llama", "gpt2"] = Field(
        "llama", description="family: llama (RMSNorm/RoPE/SwiGLU; also Mistral, Qwen2) or gpt2"
    )
    vocab_size: int = Field(8192, gt=0, description="number of token ids (embedding rows)")
    dim: int = Field(256, gt=0, description="model width (hidden size)")
    n_layers: int = Field(8, gt=0, description="number of transformer blocks")
    n_heads: int = Field(8, gt=0, description="number of query heads")
    n_kv_heads: int | None = Field(
        None, gt=0, description="key/value heads: = n_heads for MHA, fewer for GQA, 1 for MQA (None: n_heads)"
    )
    head_dim: int | None = Field(None, gt=0, description="width of one head (None: dim // n_heads)")
    hidden_dim: int = Field(1024, gt=0, description="feed-forward inner width (SwiGLU or GELU MLP)")
    max_seq_len: int = Field(1024, gt=0, description="longest sequence (RoPE table / learned positions)")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of RMSNorm / LayerNorm")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base wavelength (llama only)")
    rope_scaling: RopeScaling | None = Field(None, description="Llama-3 RoPE scaling, or None (llama only)")
    qkv_bias: bool = Field(False, description="bias on the q/k/v projections (Qwen2); gpt2 always has biases")
    tie_embeddings: bool = Field(True, description="output head shares the token-embedding weight")
    sliding_window: int | None = Field(
        None, gt=0, description="attend only to the last N positions (Mistral v0.1); None = full causal"
    )
    init_std: float = Field(0.02, gt=0, description="std of the normal init of embeddings and linear layers")

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        """Store n_kv_heads / head_dim as None when they equal their defaults, so equal shapes compare equal."""
        if isinstance(data, dict):
            data = dict(data)
            fields = cls.model_fields
            heads, dim = (
                data.get("n_heads", fields["n_heads"].default),
                data.get("dim", fields["dim"].default),
            )
            if data.get("n_kv_heads") == heads:
                data["n_kv_heads"] = None
            if (
                isinstance(dim, int)
                and isinstance(heads, int)
                and heads
                and data.get("head_dim") == dim // heads
            ):
                data["head_dim"] = None
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}) or set head_dim"
            )
        if self.arch == "gpt2" and (kv != self.n_heads or self.rope_scaling is not None):
            raise ValueError("gpt2 uses multi-head attention (n_kv_heads = n_heads) and no RoPE scaling")
        return self

    # Resolved values: the optional fields above default to these.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


# ---------------------------------------------------------------------------------------------------------
# Named sizes. Each is a function so presets never share mutable state.


def tiny() -> ModelConfig:
    """~1M-parameter Llama for unit tests and seconds-long CPU demos."""
    return ModelConfig(
        vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=256
    )


def small() -> ModelConfig:
    """~10M-parameter Llama: the CPU demo model (trains at ~1K tokens/s on 2 cores)."""
    return ModelConfig(
        vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1024, max_seq_len=512
    )


def llama_350m() -> ModelConfig:
    return ModelConfig(
        vocab_size=32000,
        dim=1024,
        n_layers=24,
        n_heads=16,
        hidden_dim=2816,
        max_seq_len=2048,
        tie_embeddings=True,
    )


def llama_1_1b() -> ModelConfig:
    """24 layers, width 2048, 16 heads (GQA 4 kv heads), SwiGLU 5632: ~1.15B with tied embeddings."""
    return ModelConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=24,
        n_heads=16,
        n_kv_heads=4,
        hidden_dim=5632,
        max_seq_len=2048,
        tie_embeddings=True,
    )


def llama_3_2_1b() -> ModelConfig:
    """Shape of meta-llama/Llama-3.2-1B."""
    return ModelConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=8192,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        tie_embeddings=True,
    )


def qwen2_5_0_5b() -> ModelConfig:
    """Shape of Qwen/Qwen2.5-0.5B (q/k/v bias, 2 kv heads)."""
    return ModelConfig(
        vocab_size=151936,
        dim=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        hidden_dim=4864,
        max_seq_len=32768,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_embeddings=True,
    )


def mistral_7b() -> ModelConfig:
    """Shape of mistralai/Mistral-7B-v0.1 (sliding window 4096)."""
    return ModelConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        max_seq_len=32768,
        rope_theta=10000.0,
        tie_embeddings=False,
        sliding_window=4096,
    )


def _gpt2(dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        arch="gpt2",
        vocab_size=50257,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        hidden_dim=4 * dim,
        max_seq_len=1024,
        norm_eps=1e-5,
        tie_embeddings=True,
    )


def gpt2_124m() -> ModelConfig:
    return _gpt2(768, 12, 12)


def gpt2_medium() -> ModelConfig:
    return _gpt2(1024, 24, 16)


def gpt2_large() -> ModelConfig:
    return _gpt2(1280, 36, 20)


def gpt2_xl() -> ModelConfig:
    return _gpt2(1600, 48, 25)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "llama-350m": llama_350m,
    "llama-1.1b": llama_1_1b,
    "llama-3.2-1b": llama_3_2_1b,
    "qwen2.5-0.5b": qwen2_5_0_5b,
    "mistral-7b": mistral_7b,
    "gpt2-124m": gpt2_124m,
    "gpt2-medium": gpt2_medium,
    "gpt2-large": gpt2_large,
    "gpt2-xl": gpt2_xl,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named size, optionally with fields replaced (e.g. `get_preset("small", vocab_size=4096)`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return ModelConfig(**{**cfg.model_dump(), **overrides}) if overrides else cfg


# ---------------------------------------------------------------------------------------------------------
# Counting. Closed forms, so they work for 7B shapes without building anything; a test checks them
# against `sum(p.numel())` of the built model.


def embedding_params(cfg: ModelConfig) -> int:
    """Token embeddings (+ learned positions for gpt2): lookups, not matmuls."""
    return cfg.vocab_size * cfg.dim + (cfg.max_seq_len * cfg.dim if cfg.arch == "gpt2" else 0)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d, hd, q, kv, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    if cfg.arch == "gpt2":
        attn = d * (3 * q * hd) + 3 * q * hd + q * hd * d + d  # q,k,v,o weights + biases
        mlp = d * f + f + f * d + d
        norms = 2 * 2 * d  # two LayerNorms, weight + bias
    else:
        attn = d * (q + 2 * kv) * hd + q * hd * d + ((q + 2 * kv) * hd if cfg.qkv_bias else 0)
        mlp = 3 * d * f  # gate, up, down
        norms = 2 * d
    return attn + mlp + norms


def num_params(cfg: ModelConfig, embedding: bool = True) -> int:
    """Total parameters (tied weights counted once). `embedding=False` drops the embedding lookups
    (tokens, positions) but keeps an untied output head, which is a matmul (Kaplan et al. 2020 convention)."""
    final_norm = 2 * cfg.dim if cfg.arch == "gpt2" else cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    body = cfg.n_layers * layer_params(cfg) + final_norm + head
    return body + (embedding_params(cfg) if embedding else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every projection plus the output head (also when tied);
    not embedding lookups, norms or biases."""
    d, hd, q, kv, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    attn = d * (q + 2 * kv) * hd + q * hd * d
    mlp = (2 if cfg.arch == "gpt2" else 3) * d * f
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) = 6 * matmul_params + 12 * n_layers * n_heads * head_dim * seq_len.

    6 = 2 (multiply-add) x 3 (forward, grad of inputs, grad of weights). The second term is the attention
    scores and weighted sum (PaLM appendix B; counted without the causal half, as PaLM and nanoGPT do for
    MFU). It equals torch's FlopCounterMode on a forward + backward exactly (see tests). Norms, biases and
    activations are left out (<0.1% at any realistic width). Inference forward is one third of this.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


# -- model_config.json: the architecture of a model folder, a quantized folder or a checkpoint ----------
MODEL_CONFIG = "model_config.json"


def read_model_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate(json.loads(Path(path).read_text("utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a valid model config ({e})") from None


def write_model_config(directory: Path, cfg: BaseModel) -> Path:
    path = Path(directory) / MODEL_CONFIG
    atomic_write_json(path, cfg.model_dump(mode="json"))
    return path
