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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer

OPSET = 18


def _causal_mask(past: int, T: int, window: int | None, device: torch.device) -> Tensor:
    """Bool (T, past + T), True = attend: keys at or before the query (and within the sliding window).

    Built from the input's shapes and passed explicitly, so the model takes none of its `T > 1` / `start == 0`
    branches, which would make the exported graph specialise on the sequence length.
    """
    qpos = torch.arange(T, device=device)[:, None] + past
    kpos = torch.arange(past + T, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    return allowed


class _FullSequence(nn.Module):
    """The model over the whole sequence, with its causal (and sliding-window) mask built from the shape."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = _causal_mask(0, input_ids.shape[1], self.model.cfg.sliding_window, input_ids.device)
        return self.model(input_ids, attn_mask=mask).float()


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
    _export(wrapper, (example,), {"input_ids": {0: batch, 1: seq}}, ["input_ids"], ["logits"], path)


def _export(
    wrapper: nn.Module,
    args: tuple[Tensor, ...],
    shapes: dict[str, Any],
    inputs: list[str],
    outputs: list[str],
    path: Path | str,
) -> None:
    """torch.onnx.export (dynamo) of `wrapper` to one self-contained .onnx file (weights inside)."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(
        logging.ERROR
    )  # torchvision note
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not actionable here
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
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


class PastKV:
    """The KV cache as an ONNX graph can express it: past keys/values (B, Hkv, P, hd) per layer come in as
    tensors and the present ones (P + T) are concatenations handed back, instead of in-place writes."""

    static = False

    def __init__(self, past: Sequence[Tensor], max_len: int) -> None:
        self.past = past
        self.present: list[Tensor] = []
        self.length = past[0].shape[2]
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.cat([self.past[2 * layer], k], dim=2)  # (B, Hkv, P + T, hd)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class _WithCache(nn.Module):
    """input_ids (B, T) + past k/v per layer (B, Hkv, P, hd) -> logits (B, T, vocab) + present k/v (P + T)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cfg = self.model.cfg
        cache = PastKV(past, cfg.max_seq_len)
        mask = _causal_mask(cache.length, input_ids.shape[1], cfg.sliding_window, input_ids.device)
        logits = self.model(input_ids, kv_cache=cache, attn_mask=mask)
        return (logits.float(), *cache.present)


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
    shapes = {"input_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past_names)}
    _export(wrapper, (ids, *past), shapes, ["input_ids", *past_names], ["logits", *present_names], path)


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
