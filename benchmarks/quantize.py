"""Weight-only quantization: lmforge's int8 / int4 (RTN, GPTQ) / NF4 vs bitsandbytes' int8 and NF4 layers.

    .venv/bin/python -m benchmarks.quantize [--model runs/demo/pretrain] [--data runs/demo/tokens] [--reps 5]

Every contestant starts from the same full-precision model (the `make demo` model by default) and has the
same Linear layers quantized (all of them inside the blocks; embeddings, norms and the tied head stay fp32):
lmforge through `quantize_model`, bitsandbytes by swapping in `bnb.nn.Linear8bitLt` (LLM.int8 with
`has_fp16_weights=False`; it casts fp32 inputs to fp16) and `bnb.nn.Linear4bit(quant_type="nf4")` (its packed
CPU kernel where a row is whole blocks of 64, its generic path for the 352-wide MLP down projections). For each we record validation perplexity
and bits per byte on the same tokens (`eval.perplexity.shards_perplexity`), bytes of the quantized layers'
weights, and batch-1 greedy decode speed through the same lmforge `Engine` (a fixed prompt, `--new` tokens,
EOS ignored). Decode runs alternate between contestants (ABAB...) and the median of `--reps` counts, with
one torch thread, timed in process CPU seconds (what other processes barely disturb) and wall seconds.
Results: benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.eval.perplexity import shards_perplexity
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.model.source import load_model
from lmforge.quant import calibration_ids, quantize_model
from lmforge.quant.quantize import set_module, target_layers
from lmforge.quant.report import quantized_layers_bytes

OUT = Path(__file__).resolve().parent / "results" / "quantize.json"


def bnb_quantize(model: nn.Module, kind: str) -> tuple[nn.Module, int]:
    """The model with its block Linears replaced by bitsandbytes layers; (model, bytes of their weights)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    nbytes = 0
    for name in target_layers(model):
        lin: Any = model.get_submodule(name)
        w = lin.weight.detach().clone()
        layer: Any
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            layer = layer.to("cpu")  # quantizes: int8 codes + one scale per row (SCB)
            nbytes += layer.weight.numel() + 4 * layer.weight.SCB.numel()
        else:
            layer = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
            layer = layer.to("cpu")
            if (
                lin.in_features % 64
            ):  # bnb's packed CPU kernel needs whole blocks per row: use its generic path
                layer.support_avx512bf16_for_cpu = False
            st = layer.weight.quant_state
            nbytes += layer.weight.numel() * layer.weight.element_size() + st.absmax.numel() * 4
        set_module(model, name, layer)
    return model.eval(), nbytes


def decode_once(model: nn.Module, tok: Any, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    engine = Engine(model, tok, max_batch_size=1)
    req = GenerationRequest(ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    c0, t0 = time.process_time(), time.perf_counter()
    [c] = engine.generate([req])
    return time.process_time() - c0, time.perf_counter() - t0, c.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/pretrain")
    ap.add_argument("--data", default="runs/demo/tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=65_536, help="validation tokens scored")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    # bitsandbytes logs this on every int8 matmul with fp32 inputs (they are cast to fp16): say it once.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    fp, tok = load_model(args.model)
    calib = calibration_ids(args.data, n=128, seq_len=min(256, fp.cfg.max_seq_len), seed=0)
    fp_bytes = sum(4 * fp.get_submodule(n).weight.numel() for n in target_layers(fp))
    models: dict[str, tuple[nn.Module, int, float]] = {"fp32": (fp, fp_bytes, 0.0)}
    for method in ("int8", "int4", "int4-gptq", "nf4"):
        t0 = time.perf_counter()
        m = quantize_model(copy.deepcopy(fp), method, calib=calib)
        models[f"lmforge {method}"] = (m, quantized_layers_bytes(m)[1], time.perf_counter() - t0)
    for kind in ("int8", "nf4"):
        t0 = time.perf_counter()
        m, nbytes = bnb_quantize(fp, kind)
        models[f"bitsandbytes {kind}"] = (m, nbytes, time.perf_counter() - t0)

    results: dict[str, dict[str, Any]] = {}
    for name, (m, nbytes, secs) in models.items():
        r = shards_perplexity(
            m, args.data, seq_len=fp.cfg.max_seq_len, max_tokens=args.max_tokens, verify=False
        )
        results[name] = {
            "perplexity": r["perplexity"],
            "bits_per_byte": r["bits_per_byte"],
            "tokens_scored": r["tokens"],
            "quantized_layer_bytes": nbytes,
            "bits_per_weight": 8 * nbytes / (fp_bytes / 4),
            "quantize_seconds": secs,
            "cpu_s": [],
            "wall_s": [],
        }
        print(
            f"{name:22s} ppl {r['perplexity']:.3f}  bpb {r['bits_per_byte']:.4f}  {8 * nbytes / (fp_bytes / 4):.3f} bits/w"
        )

    ids = list(tok.encode("To be, or not to be"))
    reference: dict[str, list[int]] = {}
    for name, (m, _, _) in models.items():  # warm-up, and each contestant's greedy tokens
        reference[name] = decode_once(m, tok, ids, args.new)[2]
    for _ in range(args.reps):
        for name, (m, _, _) in models.items():
            cpu, wall, _ = decode_once(m, tok, ids, args.new)
            results[name]["cpu_s"].append(cpu)
            results[name]["wall_s"].append(wall)
    base_ppl = results["fp32"]["perplexity"]
    for name, r in results.items():
        r["decode_tokens_per_cpu_s"] = args.new / statistics.median(r["cpu_s"])
        r["decode_tokens_per_s"] = args.new / statistics.median(r["wall_s"])
        r["perplexity_change_pct"] = 100 * (r["perplexity"] - base_ppl) / base_ppl
        r["greedy_agreement_with_fp32"] = sum(
            a == b for a, b in zip(reference[name], reference["fp32"], strict=True)
        ) / len(reference["fp32"])
    fp_speed = results["fp32"]["decode_tokens_per_cpu_s"]
    print(
        f"\n{'contestant':22s} {'ppl change':>10s} {'bits/w':>7s} {'decode tok/cpu-s':>17s} {'vs fp32':>8s}"
    )
    for name, r in results.items():
        r["decode_vs_fp32"] = r["decode_tokens_per_cpu_s"] / fp_speed
        print(
            f"{name:22s} {r['perplexity_change_pct']:+9.2f}% {r['bits_per_weight']:7.3f} "
            f"{r['decode_tokens_per_cpu_s']:17.1f} {r['decode_vs_fp32']:7.2f}x"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "data": args.data,
        "params": sum(p.numel() for p in fp.parameters()),
        "quantized_params": fp_bytes // 4,
        "new_tokens": args.new,
        "prompt_tokens": len(ids),
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()),
    }
    OUT.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
