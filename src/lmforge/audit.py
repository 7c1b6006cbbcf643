"""Tamper-evident audit trail: a hash-chained, append-only JSONL log of what every command did.

    export LMFORGE_AUDIT_LOG=~/.lmforge/audit.jsonl      # off unless set (docs/audit.md says why)
    export LMFORGE_AUDIT_KEY=~/.lmforge/audit.key        # optional: Ed25519 private key (PEM) signs each record
    append("serve.start", {"model": "runs/demo/pretrain"})  # never raises: a failure is one warning
    verify(Path(log), public_key=Path("audit.pub"))        # IntegrityError naming the first bad record

A record is one line of canonical JSON (sorted keys, no spaces): `seq` (1, 2, ...), `prev` (the previous
record's hash), `time`, `user`, `host`, `pid`, `event`, `data` and, when signed, `key` (the public key's
fingerprint); then `hash`, the SHA-256 of the canonical JSON of the record without `hash` and `sig`, and
`sig`, the Ed25519 signature of that hash. Editing a record changes its hash (or its bytes stop being
canonical), deleting or moving one breaks `seq` and `prev`, and `<log>.head` (the last seq and hash,
rewritten on each append) shows records cut from the end. Without a key, someone who can write the log can
rewrite the whole chain consistently; with one (kept where the writer of the log cannot read it), not.

Appends take an exclusive `flock` on the log, so concurrent commands chain correctly, and are fsynced.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import CONFIG_FILE
from lmforge.errors import ERROR_DIR_ENV, ConfigError, DataError, IntegrityError
from lmforge.io import atomic_write_json, sha256_file

LOG_ENV = "LMFORGE_AUDIT_LOG"
KEY_ENV = "LMFORGE_AUDIT_KEY"
GENESIS = "0" * 64  # `prev` of the first record
MANIFEST = "manifest.json"  # a stage's output manifest (data/manifest.py writes it; that layer is above this)
MANIFEST_DEPTH = 2  # <run>/checkpoints/step-N: the deepest folder a stage's manifest covers
MAX_HASHED_FILE = 64 << 20  # a raw input up to this size is hashed; a bigger one is named by size + mtime
MTIME_SLACK = 1.0  # s: an output is this run's if written after it started (for coarse-mtime filesystems)
INPUT_KEYS = ("input", "inputs", "data", "model", "base", "adapter", "tokenizer")
OUTPUT_KEYS = ("output",)
# An argument whose last dotted key matches is logged as `key=<redacted>`: secrets, and prompts (never logged).
SECRET_KEY = re.compile(
    r"^(.*_)?(key|keys|token|secret|password|passwd|credentials?|prompts?|system|messages?)$"
)
_NOT_HASHED = ("hash", "sig")


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record without its own `hash` and `sig`."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k not in _NOT_HASHED})).hexdigest()


def log_path() -> Path | None:
    """The log named by $LMFORGE_AUDIT_LOG, or None: auditing is off."""
    value = os.environ.get(LOG_ENV, "").strip()
    return Path(value).expanduser() if value else None


def head_path(log: Path) -> Path:
    return log.with_name(log.name + ".head")


# ---------------------------------------------------------------- keys (the optional `audit` extra)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the audit {what} ({e.strerror or e})") from None


def load_private_key(path: Path) -> Any:
    """An Ed25519 private key from a PEM file (`openssl genpkey -algorithm ed25519`)."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise ConfigError(
            f"{KEY_ENV} is set: signing needs the audit extra: pip install 'lmforge[audit]'"
        ) from None
    try:
        key = load_pem_private_key(_read_pem(path, "signing key"), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an unencrypted Ed25519 private key in PEM ({KEY_ENV})")
    return key


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file (`openssl pkey -in audit.key -pubout`)."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise ConfigError("checking signatures needs the audit extra: pip install 'lmforge[audit]'") from None
    try:
        key = load_pem_public_key(_read_pem(path, "public key"))
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key in PEM")
    return key


def fingerprint(public_key: Any) -> str:
    """SHA-256 of the raw 32-byte public key, in hex."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


# ---------------------------------------------------------------- writing


def _last_line(f: Any) -> bytes:
    """The last line of an open binary file (without reading the whole log)."""
    end = f.seek(0, os.SEEK_END)
    pos, buf = end, b""
    while pos > 0:
        step = min(1 << 14, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1 :]
    return buf


def _previous(f: Any, log: Path) -> tuple[int, str]:
    """(seq, hash) of the log's last record; (0, GENESIS) for an empty log."""
    line = _last_line(f)
    if not line:
        return 0, GENESIS
    if not line.endswith(b"\n"):
        raise IntegrityError(f"{log}: the last record is incomplete; run `lmforge audit verify {log}`")
    try:
        last = json.loads(line)
        return int(last["seq"]), str(last["hash"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(
            f"{log}: the last record is unreadable; run `lmforge audit verify {log}`"
        ) from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container's uid with no passwd entry
        return f"uid {os.getuid()}"


def write_records(
    log: Path, events: list[tuple[str, dict[str, Any]]], key: Any = None
) -> list[dict[str, Any]]:
    """Append records (event, data) in order under one exclusive lock and one fsync, and update
    `<log>.head`; returns the records. One record per call is `write_record`."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    with open(log, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        seq, prev = _previous(f, log)
        lines = []
        for event, data in events:
            record: dict[str, Any] = {
                "seq": seq + 1,
                "prev": prev,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "user": _user(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "event": event,
                "data": data,
            }
            if key is not None:
                record["key"] = fingerprint(key.public_key())
            record["hash"] = record_hash(record)
            if key is not None:
                record["sig"] = key.sign(record["hash"].encode("ascii")).hex()
            lines.append(canonical(record) + b"\n")
            out.append(record)
            seq, prev = record["seq"], record["hash"]
        if not out:
            return out
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())
        atomic_write_json(head_path(log), {"seq": seq, "hash": prev})
    return out


def write_record(log: Path, event: str, data: dict[str, Any], key: Any = None) -> dict[str, Any]:
    """Append one record under an exclusive lock, fsynced, and update `<log>.head`; returns the record."""
    return write_records(log, [(event, data)], key)[0]


def signing_key() -> Any:
    """The private key named by $LMFORGE_AUDIT_KEY, or None (unsigned records)."""
    key_file = os.environ.get(KEY_ENV, "").strip()
    return load_private_key(Path(key_file)) if key_file else None


def append(event: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """Record an event in $LMFORGE_AUDIT_LOG (signed with $LMFORGE_AUDIT_KEY if set). Never raises: a
    failure to audit must not cost the caller its work, so it prints one warning and returns None."""
    log = log_path()
    if log is None:
        return None
    try:
        return write_record(log, event, data, signing_key())
    except Exception as e:  # any failure is reported, none propagates
        print(f"warning: audit log {log}: not written ({e})", file=sys.stderr)
        return None


# ---------------------------------------------------------------- what a command read and wrote


def redact(args: list[str]) -> list[str]:
    """The arguments with the values of secret-looking keys (and prompts) replaced by <redacted>."""
    out = []
    for a in args:
        key, eq, _ = a.partition("=")
        secret = eq and not a.startswith("-") and SECRET_KEY.match(key.split(".")[-1].lower())
        out.append(f"{key}=<redacted>" if secret else a)
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _settings(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(dotted key -> value from the -c YAML, overridden by key=value args; positional arguments)."""
    values: dict[str, Any] = {}
    positional: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-c", "--config"):
            with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):  # the command reports it
                values.update(_flatten(yaml.safe_load(Path(next(it, "")).read_text(encoding="utf-8"))))
        elif "=" in a and not a.startswith("-"):
            key, _, raw = a.partition("=")
            try:
                values[key] = yaml.safe_load(raw) if raw else raw
            except yaml.YAMLError:
                values[key] = raw
        elif not a.startswith("-"):
            positional.append(a)
    return values, positional


def find_manifest(path: Path) -> Path | None:
    """The stage manifest covering `path`: in it or up to MANIFEST_DEPTH folders above it."""
    for folder in [path, *path.parents][: MANIFEST_DEPTH + 1]:
        if (folder / MANIFEST).is_file():
            return folder / MANIFEST
    return None


def describe(path: Path) -> dict[str, Any]:
    """How an input or output is identified: its stage manifest's SHA-256, else a file's own SHA-256."""
    path = path.resolve()
    entry: dict[str, Any] = {"path": str(path)}
    manifest = find_manifest(path) if path.is_dir() else None
    if manifest is not None:
        entry["manifest"] = sha256_file(manifest)
    elif path.is_file():
        st = path.stat()
        if st.st_size <= MAX_HASHED_FILE:
            entry["sha256"] = sha256_file(path)
        else:
            entry.update(bytes=st.st_size, mtime=int(st.st_mtime))
    return entry


def _entries(key: str, value: Any) -> list[dict[str, Any]]:
    out = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, str) and v:
            entry = describe(Path(v).expanduser()) if Path(v).expanduser().exists() else {"name": v}
            out.append({"key": key, **entry})
    return out


def command_data(command: str, args: list[str], exit_code: int, seconds: float) -> dict[str, Any]:
    """The `data` of a command record: arguments (redacted), exit code, config hash, inputs and outputs."""
    values, positional = _settings(args)
    # a positional argument is an input only if it names a file or folder (not `hf` or `--nproc`'s `2`)
    inputs = [e for p in positional if Path(p).expanduser().exists() for e in _entries("", p)]
    for key, value in values.items():
        if key.split(".")[-1] in INPUT_KEYS:
            inputs += _entries(key, value)
    data: dict[str, Any] = {
        "command": command,
        "args": redact(args),
        "cwd": os.getcwd(),
        "exit_code": exit_code,
        "seconds": round(seconds, 3),
        "inputs": inputs,
        "outputs": [],
    }
    started = time.time() - seconds - MTIME_SLACK
    for key in OUTPUT_KEYS:
        out = values.get(key)
        if exit_code != 0 or not isinstance(out, str) or not out or not Path(out).expanduser().exists():
            continue
        path = Path(out).expanduser()
        written = find_manifest(path) if path.is_dir() else path
        if written is None or written.stat().st_mtime < started:
            continue  # not written by this run (`--print-config`, `--help`): never credit it with an old output
        data["outputs"] += _entries(key, out)
        if (path / CONFIG_FILE).is_file():
            data["config_sha256"] = sha256_file(path / CONFIG_FILE)
    return data


def record_command(command: str, args: list[str], exit_code: int, seconds: float) -> None:
    """The CLI's hook: one record per command run (by the launcher, or rank 0 of the user's own torchrun)."""
    if log_path() is None or os.environ.get("RANK", "0") != "0" or os.environ.get(ERROR_DIR_ENV):
        return
    try:
        data = command_data(command, args, exit_code, seconds)
    except Exception as e:  # never lose the command's result to its record
        data = {"command": command, "args": redact(args), "exit_code": exit_code, "error": str(e)}
    append("command", data)


# ---------------------------------------------------------------- reading and verifying


@dataclass(frozen=True)
class Verified:
    records: list[dict[str, Any]]
    signed: int  # records carrying a signature
    signatures_checked: bool  # True when a public key was given (then every record is signed by it)


def _check_record(n: int, line: bytes, prev: str, public_key: Any, fp: str | None) -> dict[str, Any]:
    """The record on line n (1-based), or IntegrityError naming what is wrong with it."""
    try:
        record = json.loads(line)
        assert isinstance(record, dict)
    except (ValueError, AssertionError):
        raise IntegrityError(f"record {n}: not a JSON object (edited or truncated)") from None
    if record.get("hash") != record_hash(record):
        raise IntegrityError(f"record {n}: content does not match its hash (edited)")
    if canonical(record) + b"\n" != line:
        raise IntegrityError(f"record {n}: bytes differ from the record's canonical form (edited)")
    if record.get("seq") != n:
        seq = record.get("seq")
        raise IntegrityError(f"record {n}: sequence number {seq!r} (a record was deleted, inserted or moved)")
    if record.get("prev") != prev:
        raise IntegrityError(
            f"record {n}: previous-hash link broken (a record before it was deleted or moved)"
        )
    if public_key is not None:
        if record.get("key") != fp or not isinstance(record.get("sig"), str):
            raise IntegrityError(f"record {n}: not signed by the given key {fp}")
        try:
            public_key.verify(bytes.fromhex(record["sig"]), record["hash"].encode("ascii"))
        except Exception:  # InvalidSignature, or a malformed hex string
            raise IntegrityError(f"record {n}: invalid signature") from None
    return record


def _check_head(log: Path, records: list[dict[str, Any]]) -> None:
    head = head_path(log)
    if not head.is_file():
        if records:
            raise IntegrityError(f"{head}: missing (the log's last seq and hash; records may have been cut)")
        return
    try:
        want = json.loads(head.read_text(encoding="utf-8"))
        seq, digest = int(want["seq"]), str(want["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"{head}: unreadable") from None
    last = (records[-1]["seq"], records[-1]["hash"]) if records else (0, GENESIS)
    if (seq, digest) != last:
        raise IntegrityError(
            f"{log}: ends at record {last[0]} but {head.name} says record {seq}: records were cut from the end "
            "or the head was edited"
        )


def verify(log: Path, public_key: Path | None = None) -> Verified:
    """Check the whole chain (and every signature, given the public key); IntegrityError at the first fault."""
    log = Path(log)
    pub = load_public_key(public_key) if public_key is not None else None
    fp = fingerprint(pub) if pub is not None else None
    records: list[dict[str, Any]] = []
    prev = GENESIS
    try:
        f = open(log, "rb")  # noqa: SIM115 - closed below, after the head is read under the same lock
    except OSError as e:
        raise DataError(f"{log}: cannot read the audit log ({e.strerror or e})") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no append lands between reading the records and the head
        for n, line in enumerate(f, 1):
            try:
                records.append(_check_record(n, line, prev, pub, fp))
            except IntegrityError as e:
                raise IntegrityError(f"{log}: {e}") from None
            prev = records[-1]["hash"]
        _check_head(log, records)
    return Verified(records, sum(1 for r in records if "sig" in r), pub is not None)


__all__ = [
    "GENESIS",
    "KEY_ENV",
    "LOG_ENV",
    "Verified",
    "append",
    "canonical",
    "command_data",
    "describe",
    "find_manifest",
    "fingerprint",
    "head_path",
    "load_private_key",
    "load_public_key",
    "log_path",
    "record_command",
    "record_hash",
    "redact",
    "signing_key",
    "verify",
    "write_record",
    "write_records",
]
