"""SHA-256 manifests: every stage lists what it wrote, every later stage checks it before use.

The library every stage imports; the `lmforge data verify` command is data/verify.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import IntegrityError
from lmforge.io import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
VERSION = 1


def _listed_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def write_manifest(root: Path, *, stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under `root` (except the manifest itself) and write `root/manifest.json`."""
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _listed_files(root)
    }
    manifest = {"version": VERSION, "stage": stage, "files": files, **(extra or {})}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path}: no manifest; was this directory written by a finished lmforge stage?")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path}: key 'files' missing or not an object")
    for rel, meta in manifest["files"].items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str)
        ):
            raise IntegrityError(f"{path}: files[{rel!r}] needs 'bytes' (an integer) and 'sha256' (a string)")
    return manifest


def verify_manifest(root: Path) -> dict[str, Any]:
    """Check size and SHA-256 of every listed file; raise IntegrityError naming each bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    for rel, meta in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != meta["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {meta['bytes']} (truncated or extended)")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (file changed or corrupted)")
    if problems:
        raise IntegrityError("manifest check failed:\n  " + "\n  ".join(problems))
    return manifest


def ensure_verified(root: Path, *, skip: bool = False) -> dict[str, Any]:
    """What every stage calls on its input directory; `skip` (config `verify_input=false`) trusts it, and
    then a directory without a manifest (e.g. an HF tokenizer folder) is fine too."""
    if not skip:
        return verify_manifest(root)
    return read_manifest(root) if (Path(root) / MANIFEST).is_file() else {}


__all__ = ["MANIFEST", "ensure_verified", "read_manifest", "verify_manifest", "write_manifest"]
