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


__all__ = ["OPSET", "OnnxRunner", "check_supported", "write_onnx"]
