"""`lmforge audit verify` and `lmforge audit lineage`: check the audit chain, trace a model to its raw files.

    lmforge audit verify                       # $LMFORGE_AUDIT_LOG; exit 3 naming the first bad record
    lmforge audit verify audit.jsonl --key audit.pub   # and every record's Ed25519 signature
    lmforge audit lineage runs/demo/pretrain   # the commands that made it, back to the raw files

The library is lmforge/audit.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.audit import describe, log_path, verify
from lmforge.errors import ConfigError, DataError


def _log(arg: Path | None) -> Path:
    log = arg or log_path()
    if log is None:
        raise ConfigError("no audit log: pass LOG or set LMFORGE_AUDIT_LOG")
    return log


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmforge audit verify",
        description="Check the audit log's hash chain: exit 0 if intact, 3 naming the first edited, deleted, "
        "reordered or unsigned record.",
    )
    p.add_argument("log", nargs="?", type=Path, help="the audit log (default: $LMFORGE_AUDIT_LOG)")
    p.add_argument(
        "--key", type=Path, help="Ed25519 public key (PEM): every record must carry its valid signature"
    )
    args = p.parse_args(argv)
    log = _log(args.log)
    result = verify(log, public_key=args.key)
    sigs = (
        "all signatures valid"
        if result.signatures_checked
        else f"{result.signed} signed (signatures not checked: pass --key PUB)"
    )
    print(f"ok {log}: {len(result.records)} records, chain intact, {sigs}")
    return 0


def _identity(entry: dict[str, Any]) -> tuple[str, str] | None:
    for kind in ("manifest", "sha256"):
        if kind in entry:
            return kind, str(entry[kind])
    return None


def _producer(records: list[dict[str, Any]], ident: tuple[str, str], before: int) -> dict[str, Any] | None:
    """The latest successful command before record `before` that wrote an output with this identity."""
    for r in reversed(records[: before - 1]):
        data = r.get("data", {})
        ok = r.get("event") == "command" and data.get("exit_code") == 0
        if ok and any(_identity(o) == ident for o in data.get("outputs", [])):
            return r
    return None


def _leaf(entry: dict[str, Any], ident: tuple[str, str] | None) -> str:
    if ident is None:
        return "not hashed: a name (preset, built-in corpus)" if "name" in entry else "not hashed"
    return "raw file" if ident[0] == "sha256" else "not produced by an audited command"


def _walk(
    records: list[dict[str, Any]], entry: dict[str, Any], before: int, depth: int, seen: set[int]
) -> list[str]:
    pad = "  " * depth
    ident = _identity(entry)
    label = f"{entry['key']} = " if entry.get("key") else ""
    what = f"  {ident[0]} {ident[1][:16]}" if ident else ""
    lines = [f"{pad}{label}{entry.get('path') or entry.get('name')}{what}"]
    made = _producer(records, ident, before) if ident else None
    if made is None:
        lines[0] += f"  ({_leaf(entry, ident)})"
        return lines
    data = made["data"]
    config = f", config {data['config_sha256'][:16]}" if "config_sha256" in data else ""
    lines.append(
        f"{pad}  made by record {made['seq']}: lmforge {data['command']} at {made['time']} by "
        f"{made['user']}@{made['host']}, exit {data['exit_code']}{config}"
    )
    if made["seq"] in seen:
        return [*lines, f"{pad}  (inputs shown above)"]
    seen.add(made["seq"])
    for inp in data.get("inputs", []):
        lines += _walk(records, inp, made["seq"], depth + 1, seen)
    return lines


def lineage_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmforge audit lineage",
        description="Verify the audit log, then print the chain of commands that produced MODEL (a stage's "
        "output folder, identified by its manifest's SHA-256), back to the raw files.",
    )
    p.add_argument("model", type=Path, help="a model folder or any stage output with a manifest.json")
    p.add_argument("--log", type=Path, help="the audit log (default: $LMFORGE_AUDIT_LOG)")
    args = p.parse_args(argv)
    if not args.model.exists():
        raise DataError(f"{args.model}: no such file or folder")
    records = verify(_log(args.log)).records
    target = describe(args.model)
    ident = _identity(target)
    if ident is None or _producer(records, ident, len(records) + 1) is None:
        raise DataError(f"{args.model}: no audited command wrote it (as it is now) in {_log(args.log)}")
    print("\n".join(_walk(records, target, len(records) + 1, 0, set())))
    return 0
