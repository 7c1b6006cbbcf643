"""Audit-log cost per command: what the CLI hook adds to a command, and what `audit verify` costs.

    .venv/bin/python -m benchmarks.audit

The hook (`audit.record_command`, called once by `lmforge.cli.main` after a command) is timed in-process on
a command shaped like `lmforge tokenize -c cfg.yaml input=IN tokenizer=TOK output=OUT`: it reads the YAML,
hashes the two input manifests, the output manifest and config.yaml, takes the lock, reads the log's last
line, appends one fsynced record and rewrites the fsynced head. Cases: auditing off, unsigned, Ed25519
signed; on an empty log and on one of 10,000 records (the append reads only the tail, so it must not grow);
unsigned with fsync disabled, to show the share of the disk.
Then the whole real CLI (`python -m lmforge data verify DIR`, a fresh process each time), alternating
audit off / on, and `audit verify` over 10,000 records. Results: benchmarks/results/audit.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from lmforge import audit
from lmforge.data.manifest import write_manifest

OUT = Path(__file__).resolve().parent / "results" / "audit.json"
SRC = Path(__file__).resolve().parents[1] / "src"
N_HOOK = 200
N_CLI = 10
N_LONG = 10_000


def _stage(root: Path, name: str, files: int) -> Path:
    d = root / name
    d.mkdir()
    for i in range(files):
        (d / f"part-{i:03d}.bin").write_bytes(os.urandom(4096))
    (d / "config.yaml").write_text("command: tokenize\nseed: 0\n")
    write_manifest(d, stage=name)
    return d


def _prefill(log: Path, n: int, key: Any) -> None:
    """A valid chain of n records written in one go (the same fields write_record makes)."""
    prev, lines = audit.GENESIS, []
    for seq in range(1, n + 1):
        r: dict[str, Any] = {
            "seq": seq,
            "prev": prev,
            "time": "2026-01-01T00:00:00Z",
            "user": "u",
            "host": "h",
        }
        r.update(pid=1, event="command", data={"command": "tokenize", "i": seq})
        if key is not None:
            r["key"] = audit.fingerprint(key.public_key())
        r["hash"] = prev = audit.record_hash(r)
        if key is not None:
            r["sig"] = key.sign(prev.encode("ascii")).hex()
        lines.append(audit.canonical(r) + b"\n")
    log.write_bytes(b"".join(lines))
    audit.head_path(log).write_text(json.dumps({"seq": n, "hash": prev}))


def _hook_ms(log: Path | None, key_file: Path | None, args: list[str]) -> list[float]:
    os.environ.pop(audit.LOG_ENV, None)
    os.environ.pop(audit.KEY_ENV, None)
    if log is not None:
        os.environ[audit.LOG_ENV] = str(log)
    if key_file is not None:
        os.environ[audit.KEY_ENV] = str(key_file)
    times = []
    for _ in range(N_HOOK):
        t = time.perf_counter()
        audit.record_command("tokenize", args, 0, 1.0)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _cli_s(stage: Path, log: Path | None) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop(audit.LOG_ENV, None)
    env.pop(audit.KEY_ENV, None)
    if log is not None:
        env[audit.LOG_ENV] = str(log)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge", "data", "verify", str(stage)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t


def _summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 3), "mean_ms": round(statistics.mean(ms), 3)}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="lmforge-audit-bench-"))
    key = Ed25519PrivateKey.generate()
    key_file, pub_file = root / "audit.key", root / "audit.pub"
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    pub_file.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    inp, tok, out = _stage(root, "curated", 40), _stage(root, "tokenizer", 4), _stage(root, "tokens", 40)
    cfg = root / "tokenize.yaml"
    cfg.write_text("command: tokenize\nval_fraction: 0.02\n")
    args = ["-c", str(cfg), f"input={inp}", f"tokenizer={tok}", f"output={out}"]

    hook: dict[str, Any] = {"off": _summary(_hook_ms(None, None, args))}
    for name, k, kf in (("unsigned", None, None), ("signed", key, key_file)):
        hook[f"{name}, empty log"] = _summary(_hook_ms(root / f"{name}-new.jsonl", kf, args))
        long = root / f"{name}-long.jsonl"
        _prefill(long, N_LONG, k)
        hook[f"{name}, {N_LONG:,}-record log"] = _summary(_hook_ms(long, kf, args))
    fsync = os.fsync
    os.fsync = lambda fd: None  # the same without its three fsyncs: how much of the cost is the disk
    try:
        hook["unsigned, fsync disabled"] = _summary(_hook_ms(root / "nosync.jsonl", None, args))
    finally:
        os.fsync = fsync
    os.environ.pop(audit.LOG_ENV, None)
    os.environ.pop(audit.KEY_ENV, None)

    t = time.perf_counter()
    for _ in range(N_HOOK):  # the signing step alone, as append does it: load the key, fingerprint, sign
        k = audit.load_private_key(key_file)
        k.sign(audit.fingerprint(k.public_key()).encode("ascii"))
    hook["signing alone"] = {"mean_ms": round((time.perf_counter() - t) * 1e3 / N_HOOK, 3)}

    verify: dict[str, float] = {}
    for name, pub in (("unsigned", None), ("signed", pub_file)):
        log = root / f"{name}-long.jsonl"
        t = time.perf_counter()
        n = len(audit.verify(log, public_key=pub).records)
        verify[f"{name}, {n:,} records, s"] = round(time.perf_counter() - t, 3)

    cli_off, cli_on = [], []
    for _ in range(N_CLI):  # alternate, so that load from other jobs hits both alike
        cli_off.append(_cli_s(inp, None))
        cli_on.append(_cli_s(inp, root / "cli.jsonl"))
    cli = {
        "off_median_s": round(statistics.median(cli_off), 3),
        "on_median_s": round(statistics.median(cli_on), 3),
    }
    result = {
        "machine": platform.processor() or platform.machine(),
        "hook": hook,
        "verify": verify,
        "cli": cli,
    }
    print(json.dumps(result, indent=2))
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
