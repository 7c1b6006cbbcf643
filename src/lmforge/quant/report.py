"""What quantization cost and saved: size on disk, validation perplexity / bits per byte, decode speed.

    sizes = size_report(fp_numels, model, "runs/demo/int4/model.safetensors")
    speed = decode_speed(model, tok, prompt="To be, or not to be", tokens=64, repeats=3)
    table = format_table(report)

Decode speed is the inference engine's (`infer.engine.Engine`), batch 1, greedy, a fixed prompt and a fixed
number of new tokens (EOS ignored), prefill included; the median of `repeats` timed runs after one warm-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.model.quant import Int4Linear, Int8Linear, QNF4Linear


def numel_by_name(model: nn.Module) -> dict[str, int]:
    """Parameter and persistent-buffer sizes of a full-precision model (what its safetensors holds)."""
    return {k: v.numel() for k, v in model.state_dict().items()}


def quantized_layers_bytes(model: nn.Module) -> tuple[int, int]:
    """(weights represented, bytes of codes + scales + zeros) over the quantized layers (biases excluded)."""
    params = nbytes = 0
    for mod in model.modules():
        if isinstance(mod, (Int8Linear, Int4Linear, QNF4Linear)):
            params += mod.in_features * mod.out_features
            for name, buf in mod.named_buffers(recurse=False):
                if name in ("qweight", "scales", "zeros", "packed", "absmax"):
                    nbytes += buf.numel() * buf.element_size()
    return params, nbytes


def size_report(fp_numel: dict[str, int], qmodel: nn.Module, weights_file: Path) -> dict[str, Any]:
    total = sum(fp_numel.values())
    params, qbytes = quantized_layers_bytes(qmodel)
    file_bytes = weights_file.stat().st_size
    return {
        "params": total,
        "fp32_bytes": 4 * total,
        "fp16_bytes": 2 * total,
        "file_bytes": file_bytes,
        "vs_fp32": file_bytes / (4 * total),
        "vs_fp16": file_bytes / (2 * total),
        "quantized_params": params,
        "quantized_bytes": qbytes,
        "bits_per_weight": 8 * qbytes / params if params else None,
    }


@torch.inference_mode()
def decode_speed(model: Any, tokenizer: Any, *, prompt: str, tokens: int, repeats: int = 3) -> dict[str, Any]:
    engine = Engine(model, tokenizer, max_batch_size=1)
    ids = list(tokenizer.encode(prompt)) or [int(tokenizer.eos_id)]
    budget = min(tokens, model.cfg.max_seq_len - len(ids))
    params = SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True)
    engine.generate([GenerationRequest(ids, params.model_copy(update={"max_tokens": min(4, budget)}))])
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        [c] = engine.generate([GenerationRequest(ids, params)])
        times.append(time.perf_counter() - t0)
        n = len(c.token_ids)
    sec = statistics.median(times)
    return {
        "tokens": n,
        "prompt_tokens": len(ids),
        "seconds": sec,
        "tokens_per_s": n / sec,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (after - before) / before


def format_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per measured quantity, before / after / change."""
    t = Table(title=f"lmforge quantize: {report['method']}", title_justify="left")
    for col in ("", "before (fp)", "after", "change"):
        t.add_column(col, justify="right" if col else "left")
    s = report["size"]
    t.add_row(
        "size on disk",
        f"{s['fp32_bytes'] / 1e6:.2f} MB fp32 / {s['fp16_bytes'] / 1e6:.2f} MB fp16",
        f"{s['file_bytes'] / 1e6:.2f} MB",
        f"{100 * s['vs_fp32']:.1f}% of fp32, {100 * s['vs_fp16']:.1f}% of fp16",
    )
    if s["bits_per_weight"] is not None:
        t.add_row("quantized layers", "32 bits/weight", f"{s['bits_per_weight']:.4g} bits/weight", "")
    ppl = report.get("perplexity")
    if ppl:
        b, a = ppl["before"], ppl["after"]
        t.add_row(
            "val perplexity", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}", f"{ppl['change_pct']:+.2f}%"
        )
        if b.get("bits_per_byte") is not None:
            t.add_row(
                "val bits/byte",
                f"{b['bits_per_byte']:.4f}",
                f"{a['bits_per_byte']:.4f}",
                f"{ppl['bits_per_byte_change_pct']:+.2f}%",
            )
    dec = report.get("decode")
    if dec:
        t.add_row(
            "decode tokens/s",
            f"{dec['before']['tokens_per_s']:.1f}",
            f"{dec['after']['tokens_per_s']:.1f}",
            f"{dec['speedup']:.2f}x",
        )
    g = report.get("gptq")
    if g:
        t.add_row(
            "layer output error", f"RTN {g['rtn_error_mean']:.4g}", f"GPTQ {g['gptq_error_mean']:.4g}", ""
        )
    return t


__all__ = ["decode_speed", "format_table", "numel_by_name", "pct", "quantized_layers_bytes", "size_report"]
