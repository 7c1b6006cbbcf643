"""Encryption at rest: what AES-256-GCM (lmforge.crypt) costs on checkpoint save/load and serve start-up.

    .venv/bin/python -m benchmarks.crypt            # about two minutes on 2 cores

The model is the gpt2-124m preset with a 512-token vocabulary (85M parameters, 341 MB of fp32 weights).
- Checkpoint: `save_checkpoint` (weights + AdamW state after one step: 1.0 GB, fsynced, files.json hashed)
  and `load_checkpoint` (verify every SHA-256, then restore weights, optimizer, RNG), plaintext vs
  encrypted, best of REPEATS; throughput is checkpoint bytes / wall time.
- Serve start-up: the model part of `lmforge serve` start (`load_model` of a model folder: manifest check,
  weights, tokenizer, then the Engine and the app), plaintext vs encrypted, best of REPEATS.
- The stream format alone: sealing and opening the weights' bytes (no fsync), GB/s, beside AES-256-GCM
  on one 1 MiB segment and a plain memory copy of the weights, for scale (the machine is shared).
The peer is lmforge itself in plaintext (safetensors written by `save_file`, read memory-mapped).
Results: benchmarks/results/crypt.json.
"""

from __future__ import annotations

import io
import json
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lmforge import crypt
from lmforge.data.manifest import write_manifest
from lmforge.infer.engine import Engine
from lmforge.model.config import get_preset, write_model_config
from lmforge.model.source import load_model
from lmforge.model.tensorfile import save_tensors
from lmforge.model.transformer import build_model
from lmforge.serve.app import create_app
from lmforge.serve.state import ServeConfig
from lmforge.tokenizer import train_tokenizer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint

OUT = Path(__file__).resolve().parent / "results" / "crypt.json"
REPEATS = 3
KEY = secrets.token_bytes(32)


def best(fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    torch.manual_seed(0)
    tok = train_tokenizer(["To be, or not to be, that is the question."] * 50, vocab_size=300)
    cfg = get_preset("gpt2-124m", vocab_size=512)
    model = build_model(cfg, seed=0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
    opt.step()
    results: dict[str, Any] = {"model": "gpt2-124m, vocab 512", "weight_bytes": weights, "repeats": REPEATS}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        for mode in ("plaintext", "encrypted"):
            crypt.restore((KEY, mode == "encrypted"))
            ck = root / mode / "checkpoints"
            save = best(lambda ck=ck: save_checkpoint(ck, 1, model, opt, {"tokens": 0}, model_config=cfg))
            path = ck / "step-000001"
            size = folder_bytes(path)
            load = best(lambda path=path: load_checkpoint(path, model, opt))
            folder = root / mode / "model"
            folder.mkdir(parents=True)
            save_tensors(
                {k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "model.safetensors"
            )
            write_model_config(folder, cfg)
            tok.save(folder)
            write_manifest(folder, stage="bench")

            def start(folder: Path = folder) -> None:
                m, t = load_model(folder)
                scfg = ServeConfig(model="bench")
                create_app(Engine(m, t, max_batch_size=scfg.max_batch_size), t, scfg, None).state.close()

            serve = best(start)
            results[mode] = {
                "checkpoint_bytes": size,
                "save_s": round(save, 3),
                "load_s": round(load, 3),
                "save_GBps": round(size / save / 1e9, 3),
                "load_GBps": round(size / load / 1e9, 3),
                "serve_start_s": round(serve, 3),
            }
            print(mode, results[mode], flush=True)
    data = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    sink = io.BytesIO()
    t0 = time.perf_counter()
    w = crypt.EncryptedWriter(sink, KEY)
    w.write(data)
    w.close()
    seal_s = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(dir=os.environ.get("BENCH_TMP")) as f:
        f.write(sink.getvalue())
        f.flush()
        t0 = time.perf_counter()
        reader = crypt.EncryptedReader(f.name, KEY)
        assert reader.readall() == data
        open_s = time.perf_counter() - t0
        reader.close()
    chunk, nonce, aead = data[: crypt.SEGMENT], bytes(12), AESGCM(KEY)  # speed only: nothing is kept
    t0 = time.perf_counter()
    for _ in range(100):
        sealed = aead.encrypt(nonce, chunk, None)
    aes_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    copied = bytes(bytearray(data))  # the machine's memory copy speed, for scale
    copy_s = time.perf_counter() - t0
    assert len(copied) == len(data) and len(sealed) == len(chunk) + 16
    results["cipher_GBps"] = {
        "stream_seal": round(len(data) / seal_s / 1e9, 3),
        "stream_open": round(len(data) / open_s / 1e9, 3),
        "aes_gcm_1MiB_only": round(100 * len(chunk) / aes_s / 1e9, 3),
        "memcpy_for_scale": round(len(data) / copy_s / 1e9, 3),
    }
    p, e = results["plaintext"], results["encrypted"]
    results["overhead"] = {
        "save": round(e["save_s"] / p["save_s"], 2),
        "load": round(e["load_s"] / p["load_s"], 2),
        "serve_start": round(e["serve_start_s"] / p["serve_start_s"], 2),
    }
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["overhead"]), json.dumps(results["cipher_GBps"]))


if __name__ == "__main__":
    main()
