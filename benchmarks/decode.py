"""CPU decode speed at batch 1: lmforge fp32 / int8 / int4 against llama.cpp (GGUF f32, f16, q8_0) and
onnxruntime, same model, same prompt, same number of tokens, same threads, one process.

    .venv/bin/python -m benchmarks.decode [--new 128] [--prompt 32] [--reps 3] [--threads 1]

Models (`--models`): "llama-14m", the 13.8M Llama of benchmarks/model.py (6 layers, width 384, tied, random
weights, vocabulary 8192 of a BPE tokenizer trained here on Shakespeare), and "demo", the trained demo model
(runs/demo/pretrain, skipped when absent). Every artefact comes from lmforge's own exporters and quantizer.
Contestants, greedy, EOS ignored:
- lmforge fp32 / int8 (per channel) / int4 (RTN, group 128): `infer.Engine` with its KV cache
- llama.cpp through llama-cpp-python: our GGUF f32 / f16 / q8_0 with llama.cpp's KV cache
- onnxruntime with our KV-cache decode graph (model-decode.onnx: past/present keys and values as tensors)
- with --onnx-no-cache, onnxruntime with the full-sequence graph (no KV cache: each step recomputes the
  whole prefix), under its own name; it is not a like-for-like decode number.
For each contestant, t(1) (prefill + 1 token) and t(new) are timed; decode tokens/s = (new - 1) / (t(new) -
t(1)). Repetitions alternate between contestants and the median is kept; process CPU seconds (all threads
of this process) and wall seconds are both recorded; ratios are against lmforge fp32.
Results: benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.export.gguf import LlamaCppRunner, write_gguf
from lmforge.export.onnx import OnnxDecoder, OnnxRunner, write_onnx, write_onnx_decode
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer

OUT = Path(__file__).resolve().parent / "results" / "decode.json"
DEMO = Path("runs/demo/pretrain")
LLAMA_14M = {"dim": 384, "n_layers": 6, "n_heads": 6, "hidden_dim": 1024, "tie_embeddings": True}

Decoder = Callable[[list[int], int], list[int]]  # (prompt ids, new tokens) -> generated ids


def _texts() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tokenizer_corpus import shakespeare_docs

    return [d["text"] for d in shakespeare_docs(files=4)]


def _model(name: str, texts: list[str], max_len: int) -> tuple[Transformer, Tokenizer]:
    if name == "demo":
        from lmforge.model.source import load_model

        return load_model(DEMO)
    tok = train_tokenizer(texts, vocab_size=8192)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=max_len, **LLAMA_14M)
    return build_model(cfg, seed=0).eval(), tok


def lmforge_decoder(model: Transformer, tok: Tokenizer) -> Decoder:
    engine = Engine(model, tok, max_batch_size=1)

    def run(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return list(engine.generate([GenerationRequest(prompt, params)])[0].token_ids)

    return run


def llama_cpp_decoder(path: Path, n_ctx: int, threads: int) -> tuple[Decoder, Any]:
    # Through LlamaCppRunner.load: llama.cpp's plain CPU kernels, since the AMX q8_0 matmul of the vendored
    # llama.cpp crashes on AMX CPUs (see its docstring).
    llm = LlamaCppRunner.load(
        path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,  # llama-cpp-python fills `scores` only then; decode steps compute one row either way
        verbose=False,
    )

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if len(out) < n:
                llm.eval([nxt])
        return out

    return run, llm


def onnx_decoder(path: Path, threads: int) -> Decoder:
    runner = OnnxRunner(path, threads)

    def run(prompt: list[int], n: int) -> list[int]:
        ids, out = list(prompt), []
        for _ in range(n):
            nxt = int(runner(ids)[-1].argmax())  # full prefix every step: no KV cache in the graph
            out.append(nxt)
            ids.append(nxt)
        return out

    return run


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def run(
    name: str, new: int, prompt_len: int, reps: int, threads: int, tmp: Path, no_cache_onnx: bool = False
) -> dict[str, Any]:
    from lmforge.quant import quantize_model

    torch.set_num_threads(threads)
    texts = _texts()
    model, tok = _model(name, texts, prompt_len + new + 8)
    stream = [i for t in texts[:20] for i in tok.encode(t)]
    prompt = stream[1000 : 1000 + prompt_len]
    n_ctx = prompt_len + new + 8
    contestants: dict[str, Decoder] = {}
    notes: dict[str, str] = {}
    int8 = quantize_model(copy.deepcopy(model), "int8")
    int4 = quantize_model(copy.deepcopy(model), "int4", group_size=128)
    contestants["lmforge_fp32"] = lmforge_decoder(model, tok)
    contestants["lmforge_int8"] = lmforge_decoder(int8, tok)  # type: ignore[arg-type]
    contestants["lmforge_int4"] = lmforge_decoder(int4, tok)  # type: ignore[arg-type]
    llms: list[Any] = []
    try:
        import llama_cpp

        for qtype in ("f32", "f16", "q8_0"):
            path = tmp / f"{name}-{qtype}.gguf"
            write_gguf(model, tok, path, qtype)
            dec, llm = llama_cpp_decoder(path, n_ctx, threads)
            contestants[f"llama_cpp_{qtype}"] = dec
            llms.append(llm)
        notes["llama_cpp"] = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        notes["llama_cpp"] = "not installed (pip install -c constraints.txt llama-cpp-python)"
    write_onnx_decode(model, tmp / f"{name}-decode.onnx")
    contestants["onnxruntime_kv_cache"] = OnnxDecoder(
        tmp / f"{name}-decode.onnx", model.cfg, threads
    ).generate
    if no_cache_onnx:
        onnx_path = tmp / f"{name}.onnx"
        write_onnx(model, onnx_path)
        contestants["onnxruntime_no_kv_cache"] = onnx_decoder(onnx_path, threads)
        notes["onnxruntime_no_kv_cache"] = "full-sequence graph, prefix recomputed each step: not comparable"

    reference = contestants["lmforge_fp32"](prompt, new)
    agreement = {}
    for c, dec in contestants.items():
        got = dec(prompt, new)  # also the warm-up
        agreement[c] = round(sum(a == b for a, b in zip(got, reference, strict=True)) / new, 4)
    times: dict[str, dict[int, list[tuple[float, float]]]] = {c: {1: [], new: []} for c in contestants}
    for _ in range(reps):
        for n in (1, new):
            for c, dec in contestants.items():
                times[c][n].append(_timed(lambda dec=dec, n=n: dec(prompt, n)))  # type: ignore[misc]
    rows: dict[str, Any] = {}
    for c in contestants:
        row = {}
        for kind, k in (("cpu", 0), ("wall", 1)):
            t1 = statistics.median(t[k] for t in times[c][1])
            tn = statistics.median(t[k] for t in times[c][new])
            row[f"decode_tok_s_{kind}"] = round((new - 1) / max(tn - t1, 1e-9), 1)
        rows[c] = row
    for c, row in rows.items():
        for kind in ("cpu", "wall"):
            row[f"ratio_vs_lmforge_fp32_{kind}"] = round(
                row[f"decode_tok_s_{kind}"] / rows["lmforge_fp32"][f"decode_tok_s_{kind}"], 2
            )
        row["greedy_agreement_vs_lmforge_fp32"] = agreement[c]
        print(f"{name} {c}: {json.dumps(row)}", flush=True)
    for llm in llms:
        llm.close()
    return {
        "config": {
            "model": name,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "shape": model.cfg.model_dump(mode="json"),
            "prompt_tokens": prompt_len,
            "new_tokens": new,
            "batch": 1,
            "reps": reps,
            "threads": threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "notes": notes,
        "results": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median kept)")
    ap.add_argument("--threads", type=int, default=1, help="threads for every runtime")
    ap.add_argument("--models", default="llama-14m,demo", help="comma-separated: llama-14m, demo")
    ap.add_argument(
        "--onnx-no-cache", action="store_true", help="also time the full-sequence ONNX graph (no KV cache)"
    )
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    args = ap.parse_args()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models.split(","):
            if m == "demo" and not (DEMO / "model").is_dir():
                print(f"skipping demo: {DEMO}/model not found (make demo)", flush=True)
                continue
            res[m] = run(m, args.new, args.prompt, args.reps, args.threads, Path(tmp), args.onnx_no_cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    for m, r in res.items():
        print(
            f"{m} ({r['config']['params_m']}M params), decode tok/s at batch 1, CPU time (x vs lmforge fp32):"
        )
        for c, row in r["results"].items():
            print(f"  {c:26s} {row['decode_tok_s_cpu']:>9} (x{row['ratio_vs_lmforge_fp32_cpu']})")


if __name__ == "__main__":
    main()
