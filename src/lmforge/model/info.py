"""`lmforge model info NAME|PATH`: parameters, shapes, FLOPs per token and memory of a model, without weights.

    lmforge model info llama-3.2-1b
    lmforge model info path/to/hf-folder seq_len=4096 batch_size=4
    lmforge model info configs/model.yaml format=json

NAME is a preset (`lmforge.model.config.PRESETS`); PATH is an HF folder (config.json), a run or stage folder
with a config.yaml holding a `model:` section, or a YAML/JSON file with ModelConfig keys (or a `model:` key).
Everything is computed from the shape (meta device), so a 7B model costs nothing to inspect.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import Field
from rich.console import Console
from rich.table import Table

from lmforge.config import ConfigRef, EncryptionConfig, Section, encryption_field, parse_command
from lmforge.model.config import ModelConfig, embedding_params, flops_per_token, matmul_params, num_params
from lmforge.model.source import model_config
from lmforge.model.transformer import Transformer

GIB = 1024**3
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "4-bit": 0.5}  # per parameter, scales not counted
# Training state per parameter with AdamW: weights + grads + two moments (+ fp32 master copy when mixed).
ADAMW_BYTES = {
    "fp32": 4 + 4 + 8,  # fp32 weights, fp32 grads, fp32 m and v
    "bf16 mixed": 2 + 2 + 4 + 8,  # bf16 weights and grads, fp32 master weights, fp32 m and v
    "bf16 pure": 2 + 2 + 4,  # everything bf16 (no master copy)
}


class InfoConfig(Section):
    model: ConfigRef = Field(..., description="preset name, HF folder, run folder, or YAML/JSON model config")
    seq_len: int | None = Field(
        None, gt=0, description="sequence length for FLOPs and activations (None: max_seq_len, at most 4096)"
    )
    batch_size: int = Field(1, gt=0, description="sequences per step, for the activation-memory estimate")
    format: Literal["table", "json"] = Field("table", description="print tables, or the numbers as JSON")
    encryption: EncryptionConfig = encryption_field()


CONFIG = InfoConfig


def layer_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter outside the blocks and of block 0 (the others are identical)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return [
        (name, tuple(p.shape))
        for name, p in model.named_parameters()
        if not name.startswith("layers.") or name.startswith("layers.0.")
    ]


def activation_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 4) -> int:
    """Rough size of what autograd keeps per token (no activation checkpointing, flash/SDPA attention, no
    T x T scores): per block the norm inputs/outputs, q/k/v, attention output, MLP inputs/intermediates and
    residuals; plus the logits (kept twice: logits and the softmax for the loss). An estimate, not a bound."""
    q, kv, hd, d, f = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.dim, cfg.hidden_dim
    per_layer = 6 * d + (2 * q + 2 * kv) * hd + (4 * f if cfg.arch == "llama" else 2 * f)
    return (cfg.n_layers * per_layer + 2 * cfg.vocab_size) * bytes_per_elem


def model_info(cfg: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    seq = seq_len or min(cfg.max_seq_len, 4096)
    total, non_emb = num_params(cfg), num_params(cfg, embedding=False)
    return {
        "config": cfg.model_dump(mode="json"),
        "params": {
            "total": total,
            "embedding": embedding_params(cfg),
            "non_embedding": non_emb,
            "matmul": matmul_params(cfg),
            "tied_embeddings": cfg.tie_embeddings,
        },
        "shapes": {name: list(shape) for name, shape in layer_shapes(cfg)},
        "seq_len": seq,
        "flops_per_token": {"train": flops_per_token(cfg, seq), "forward": flops_per_token(cfg, seq) / 3},
        "weights_gib": {k: total * b / GIB for k, b in WEIGHT_BYTES.items()},
        "adamw_state_gib": {k: total * b / GIB for k, b in ADAMW_BYTES.items()},
        "activations_gib": {
            "batch_size": batch_size,
            "fp32": activation_bytes_per_token(cfg, 4) * seq * batch_size / GIB,
            "bf16": activation_bytes_per_token(cfg, 2) * seq * batch_size / GIB,
        },
    }


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_info(info: dict[str, Any], title: str) -> None:
    console = Console()
    p = info["params"]
    t = Table(title=f"{title}: parameters", show_header=False)
    for key in ("total", "embedding", "non_embedding", "matmul"):
        t.add_row(key.replace("_", "-"), f"{p[key]:,}", _fmt(p[key]))
    t.add_row("tied embeddings", str(p["tied_embeddings"]), "")
    console.print(t)
    n_layers = info["config"]["n_layers"]
    t = Table(title=f"shapes (block 0 shown; {n_layers} identical blocks)")
    t.add_column("parameter")
    t.add_column("shape", justify="right")
    for name, shape in info["shapes"].items():
        t.add_row(name, " x ".join(map(str, shape)))
    console.print(t)
    f = info["flops_per_token"]
    t = Table(title=f"compute at seq_len {info['seq_len']}", show_header=False)
    t.add_row("training FLOPs/token (6N + attention)", _fmt(f["train"]))
    t.add_row("forward FLOPs/token", _fmt(f["forward"]))
    console.print(t)
    t = Table(title="memory (GiB)")
    t.add_column("what")
    t.add_column("GiB", justify="right")
    for k, v in info["weights_gib"].items():
        t.add_row(f"weights {k}", f"{v:.3f}")
    for k, v in info["adamw_state_gib"].items():
        t.add_row(f"AdamW training state, {k} (weights+grads+moments)", f"{v:.3f}")
    a = info["activations_gib"]
    t.add_row(f"activations fp32, batch {a['batch_size']} (estimate)", f"{a['fp32']:.3f}")
    t.add_row(f"activations bf16, batch {a['batch_size']} (estimate)", f"{a['bf16']:.3f}")
    console.print(t)


def main(argv: list[str]) -> int:
    # `model info NAME` reads better than `model info model=NAME`: a bare first argument is the model.
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"model={argv[0]}", *argv[1:]]
    cfg = parse_command(
        argv,
        InfoConfig,
        "model info",
        "Parameters (total, embedding, non-embedding), per-layer shapes, training FLOPs per token and the memory "
        "of weights (fp32/bf16/int8/4-bit) and of AdamW training, computed from the shape alone.",
        "lmforge model info llama-3.2-1b seq_len=2048 batch_size=8",
    )
    info = model_info(model_config(cfg.model), cfg.seq_len, cfg.batch_size)
    if cfg.format == "json":
        print(json.dumps(info, indent=2))
    else:
        print_info(info, cfg.model)
    return 0
