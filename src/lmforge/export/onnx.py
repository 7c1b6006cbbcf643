"""ONNX export of the full-sequence forward: input_ids (batch, seq) int64 -> logits (batch, seq, vocab) fp32.

    from lmforge.export.onnx import write_onnx, OnnxRunner
    write_onnx(model, "out/model.onnx")                      # torch.onnx.export(dynamo=True)
    logits = OnnxRunner("out/model.onnx")(ids)                # onnxruntime, CPU

Batch and sequence length are dynamic (sequence up to max_seq_len). The graph has no KV cache: generating
with it recomputes the whole prefix at every step, so it suits scoring and short prompts, not fast decoding.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer

OPSET = 18


class _FullSequence(nn.Module):
    """The model with its causal (and sliding-window) mask built from the input's shape.

    An explicit boolean mask avoids the `T > 1` branch that picks SDPA's is_causal flag, which would make
    the exported graph specialise on the sequence length.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        allowed = pos[None, :] <= pos[:, None]  # (T, T): key <= query
        window = self.model.cfg.sliding_window
        if window is not None:
            allowed = allowed & (pos[None, :] > pos[:, None] - window)
        return self.model(input_ids, attn_mask=allowed).float()


def check_supported(model: nn.Module) -> None:
    if not isinstance(model, Transformer):
        raise ConfigError(
            f"onnx: only lmforge Transformer models export to ONNX (got {type(model).__name__})"
        )


def write_onnx(model: Transformer, path: Path | str, *, example_len: int = 8) -> None:
    """Export with the dynamo exporter to one self-contained .onnx file (weights inside)."""
    check_supported(model)
    wrapper = _FullSequence(model).eval()
    example = torch.zeros(2, min(example_len, model.cfg.max_seq_len), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=model.cfg.max_seq_len)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(
        logging.ERROR
    )  # torchvision note
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not actionable here
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            input_names=["input_ids"],
            output_names=["logits"],
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)


class OnnxRunner:
    """onnxruntime session for an exported graph; call with ids (B, T) -> logits (B, T, vocab) as numpy."""

    def __init__(self, path: Path | str, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        (logits,) = self.session.run(["logits"], {"input_ids": arr[None] if arr.ndim == 1 else arr})
        return np.asarray(logits)[0] if arr.ndim == 1 else np.asarray(logits)


# ---------------------------------------------------------------------------------------------------------
# Decode graph with a KV cache (past keys/values in, present keys/values out)


class _WithCache(nn.Module):
    """input_ids (B, T) + past k/v per layer (B, Hkv, P, hd) -> logits (B, T, vocab) + present k/v (P + T).

    The same modules and math as `Transformer.forward`, with the cache passed as tensors instead of being
    written in place, which is what an ONNX graph can express.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        import torch.nn.functional as F

        from lmforge.model.transformer import apply_rope

        m, cfg = self.model, self.model.cfg
        B, T = input_ids.shape
        P = past[0].shape[2]
        x = m.tok_embeddings(input_ids)  # (B, T, dim)
        cos = sin = None
        if m.pos_embeddings is not None:
            x = x + m.pos_embeddings.weight[P : P + T]
        else:
            cos, sin = m.rope_cos[P : P + T], m.rope_sin[P : P + T]  # (T, hd)
        qpos = torch.arange(T, device=x.device)[:, None] + P
        kpos = torch.arange(P + T, device=x.device)[None, :]
        allowed = kpos <= qpos  # (T, P + T)
        if cfg.sliding_window is not None:
            allowed = allowed & (kpos > qpos - cfg.sliding_window)
        present: list[Tensor] = []
        for i, block in enumerate(m.layers):
            layer: Any = block
            a: Any = layer.attn
            h = layer.attn_norm(x)
            q = a.q(h).view(B, T, a.n_heads, a.hd).transpose(1, 2)  # (B, H, T, hd)
            k = a.k(h).view(B, T, a.n_kv, a.hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = a.v(h).view(B, T, a.n_kv, a.hd).transpose(1, 2)
            if cos is not None and sin is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, Hkv, P + T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            rep = a.n_heads // a.n_kv
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
            x = x + a.o(y.transpose(1, 2).reshape(B, T, a.n_heads * a.hd))
            x = x + layer.mlp(layer.mlp_norm(x))
        x = m.norm(x)
        weight = m.tok_embeddings.weight if m.output is None else m.output.weight
        return (F.linear(x, weight).float(), *present)


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")]
    return past, [p.replace("past_", "present_") for p in past]


def write_onnx_decode(model: Transformer, path: Path | str) -> None:
    """The KV-cache graph: run the prompt with empty past (P = 0), then one token at a time."""
    check_supported(model)
    cfg = model.cfg
    wrapper = _WithCache(model).eval()
    past_names, present_names = cache_names(cfg.n_layers)
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = tuple(torch.zeros(1, cfg.kv_heads, 5, cfg.head_size) for _ in past_names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    past_len = torch.export.Dim("past", min=0, max=cfg.max_seq_len)
    shapes = ({0: batch, 1: seq}, *({0: batch, 2: past_len} for _ in past_names))
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (ids, *past),
            dynamo=True,
            dynamic_shapes={"input_ids": shapes[0], "past": tuple(shapes[1:])},
            input_names=["input_ids", *past_names],
            output_names=["logits", *present_names],
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)


class OnnxDecoder:
    """Greedy decoding with the KV-cache graph on onnxruntime (batch 1)."""

    def __init__(self, path: Path | str, model_cfg: Any, threads: int = 0) -> None:
        self.runner = OnnxRunner(path, threads)
        self.cfg = model_cfg
        self.past_names, self.present_names = cache_names(model_cfg.n_layers)

    def step(self, ids: Any, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.asarray(ids, dtype=np.int64)[None]} | dict(
            zip(self.past_names, past, strict=True)
        )
        out = self.runner.session.run(["logits", *self.present_names], feeds)
        return np.asarray(out[0])[0], [np.asarray(o) for o in out[1:]]

    def generate(self, prompt: Any, n: int) -> list[int]:
        empty = np.zeros((1, self.cfg.kv_heads, 0, self.cfg.head_size), dtype=np.float32)
        logits, past = self.step(list(prompt), [empty] * len(self.past_names))
        out: list[int] = []
        for _ in range(n):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if len(out) < n:
                logits, past = self.step([nxt], past)
        return out


__all__ = ["OPSET", "OnnxDecoder", "OnnxRunner", "check_supported", "write_onnx", "write_onnx_decode"]
