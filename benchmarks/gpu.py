"""The GPU numbers in one short run: pretraining MFU, QLoRA peak memory at 8B scale, decode bandwidth.

    .venv/bin/python -m benchmarks.gpu              # on a CUDA machine: a few minutes
    .venv/bin/python -m benchmarks.gpu --smoke      # tiny shapes on the CPU: checks that the script runs

1. Pretraining MFU: gpt2-124m and llama-350m (random weights, random tokens) at sequence 1024 and 2048,
   bf16 autocast, `torch.compile`, fused AdamW, clipping: the training step of `lmforge pretrain`
   (objective `causal_lm`, the optimizer groups of train/optim.py). tokens/s over timed steps after the
   compile warm-up; MFU = tokens/s x training FLOPs per token (6N + attention, model/config.py) / the
   card's dense bf16 peak; peak memory per parameter = torch.cuda.max_memory_allocated / parameters.
2. QLoRA memory: a randomly initialised model with Llama-3.1-8B's shape (bf16), its Linear layers turned
   into NF4 + LoRA rank 8 on q/k/v/o/gate/up/down (model/lora.py), sequence 2048, batch 1, activation
   checkpointing, AdamW on the adapters: peak allocated memory over the training steps (the anchor:
   torchtune's 7.4 GiB for its Llama-3.1-8B QLoRA recipe) and tokens/s.
3. Decode: the engine (infer/engine.py, compiled) at batch 1 on llama-1.1b in bf16: tokens/s and the
   fraction of the card's memory bandwidth it uses (each step reads every weight once, plus the KV cache).
Results: benchmarks/results/gpu.json (not written with --smoke).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.model.config import ModelConfig, flops_per_token, get_preset, num_params
from lmforge.model.transformer import build_model
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import OptimConfig, build_optimizer

OUT = Path(__file__).resolve().parent / "results" / "gpu.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _card(device: torch.device) -> tuple[str, float | None, float | None]:
    """(name, dense bf16 peak FLOP/s, memory bandwidth bytes/s) from the planner's device table."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None, None
    from lmforge.plan.hardware import GPUS

    name = torch.cuda.get_device_name(device)
    key = {"H200": "h200", "H100": "h100", "A100": "a100-80gb", "4090": "rtx-4090", "3090": "rtx-3090"}
    hw = next((GPUS[v] for k, v in key.items() if k in name), None)
    return name, (hw.peak_flops if hw else None), (hw.bandwidth if hw else None)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def pretrain_mfu(
    preset: str, seq: int, micro: int, steps: int, device: torch.device, compile: bool, peak: float | None
) -> dict[str, Any]:
    cfg = get_preset(preset, max_seq_len=seq, vocab_size=50304 if preset.startswith("gpt2") else 32000)
    if device.type == "cpu":  # --smoke
        cfg = get_preset("tiny", max_seq_len=seq)
    model = build_model(cfg, device=device)
    run = torch.compile(model) if compile else model
    opt = build_optimizer(model, OptimConfig(lr=3e-4))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=gen).to(device)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        with _autocast(device):
            loss_sum, n = causal_lm(run, batch)
            loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(3):  # compile and allocator warm-up
        step()
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    tps = steps * micro * seq / seconds
    fpt = flops_per_token(cfg, seq)
    n_params = num_params(cfg)
    out = {
        "model": preset if device.type == "cuda" else "tiny",
        "params": n_params,
        "seq_len": seq,
        "micro_batch": micro,
        "timed_steps": steps,
        "tokens_per_s": tps,
        "mfu": tps * fpt / peak if peak else None,
        "peak_memory_gib": _peak(device) / 2**30,
        "peak_bytes_per_param": _peak(device) / n_params,
        "warmup_seconds": warm,
        "last_loss": last,
    }
    return out


def llama_3_1_8b(seq: int) -> ModelConfig:
    """Llama-3.1-8B's shape (RoPE scaling left out: it changes no tensor size)."""
    return ModelConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        max_seq_len=seq,
        rope_theta=500000.0,
        tie_embeddings=False,
    )


def qlora_memory(seq: int, steps: int, device: torch.device) -> dict[str, Any]:
    from lmforge.model.lora import LoraConfig, apply_lora
    from lmforge.train.prepare import apply_activation_checkpointing

    cfg = llama_3_1_8b(seq) if device.type == "cuda" else get_preset("tiny", max_seq_len=seq)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype)
    summary = apply_lora(model, LoraConfig(rank=8, alpha=16), quantize_base=True)
    apply_activation_checkpointing(model)
    model.train()
    _reset_peak(device)
    after_load = _peak(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=gen).to(device)
        with _autocast(device):
            loss_sum, n = causal_lm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {
        "shape": "Llama-3.1-8B" if device.type == "cuda" else "tiny",
        "params": num_params(cfg),
        "trainable": summary["trainable"],
        "seq_len": seq,
        "weights_gib": after_load / 2**30,
        "peak_memory_gib": _peak(device) / 2**30,
        "anchor_torchtune_gib": 7.4,
        "tokens_per_s": steps * seq / seconds,
    }
    del model, opt
    return out


def decode_bandwidth(
    new: int, device: torch.device, compile: bool, bandwidth: float | None
) -> dict[str, Any]:
    import sys

    from lmforge.infer.engine import Engine, GenerationRequest
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer import train_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tokenizer_corpus import shakespeare_docs

    tok = train_tokenizer([d["text"] for d in shakespeare_docs(files=1)], vocab_size=512)
    preset = "llama-1.1b" if device.type == "cuda" else "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset(preset, max_seq_len=1024)
    model = build_model(cfg, device=device, dtype=dtype)
    engine = Engine(model, tok, max_batch_size=1, compile=compile)
    prompt = tok.encode("To be, or not to be, that is the question")
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        engine.generate([GenerationRequest(prompt, params.model_copy(update={"max_tokens": n}))])
        _sync(device)
        return time.perf_counter() - t0

    run(new)  # compile / warm-up
    t1, tn = min(run(1) for _ in range(3)), min(run(new) for _ in range(3))
    tps = (new - 1) / (tn - t1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * cfg.n_layers * (cfg.n_kv_heads or cfg.n_heads) * cfg.dim // cfg.n_heads
    kv_bytes = kv * (len(prompt) + new // 2) * torch.finfo(dtype).bits // 8  # the average cache read
    per_token = weight_bytes + kv_bytes
    return {
        "model": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compile,
        "new_tokens": new,
        "tokens_per_s": tps,
        "bytes_per_token": per_token,
        "bandwidth_fraction": tps * per_token / bandwidth if bandwidth else None,
        "anchor_fraction": 0.69,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, nothing written")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--parts", default="mfu,qlora,decode", help="which measurements, comma-separated")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    compile = not (args.no_compile or smoke)
    steps = 2 if smoke else args.steps
    name, peak, bandwidth = _card(device)
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "peak_flops": peak}
    if "mfu" in parts:
        runs = [
            ("gpt2-124m", 1024, 16),
            ("gpt2-124m", 2048, 8),
            ("llama-350m", 1024, 16),
            ("llama-350m", 2048, 8),
        ]
        results["pretrain"] = []
        for preset, seq, micro in runs:
            r = pretrain_mfu(
                preset, 64 if smoke else seq, 2 if smoke else micro, steps, device, compile, peak
            )
            print(json.dumps(r), flush=True)
            results["pretrain"].append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "qlora" in parts:
        results["qlora"] = qlora_memory(64 if smoke else 2048, steps, device)
        print(json.dumps(results["qlora"]), flush=True)
    if "decode" in parts:
        results["decode"] = decode_bandwidth(16 if smoke else 256, device, compile, bandwidth)
        print(json.dumps(results["decode"]), flush=True)
    if not smoke:
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        print(f"-> {OUT}")


if __name__ == "__main__":
    main()
