"""SHA-256 manifests: every stage lists what it wrote, every later stage checks it before use.

The library every stage imports; the `lmforge data verify` command is data/verify.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmforge.errors import IntegrityError
from lmforge.io import atomic_write_json, sha256_file
from lmforge.model.integrity import MANIFEST, file_problem, read_manifest

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


def verify_manifest(root: Path) -> dict[str, Any]:
    """Check size and SHA-256 of every listed file; raise IntegrityError naming each bad file (one line,
    as the CLI prints it)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = [p for rel, meta in sorted(manifest["files"].items()) if (p := file_problem(root / rel, meta))]
    if problems:
        raise IntegrityError("manifest check failed: " + "; ".join(problems))
    return manifest


def ensure_verified(root: Path, *, skip: bool = False) -> dict[str, Any]:
    """What every stage calls on its input directory; `skip` (config `verify_input=false`) trusts it, and
    then a directory without a manifest (e.g. an HF tokenizer folder) is fine too, with a warning."""
    if not skip:
        return verify_manifest(root)
    print(f"warning: verify_input=false: {root} is used without checking its manifest", file=sys.stderr)
    return read_manifest(root) if (Path(root) / MANIFEST).is_file() else {}


__all__ = ["ensure_verified", "verify_manifest", "write_manifest"]
