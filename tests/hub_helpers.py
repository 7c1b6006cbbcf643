"""A real Hugging Face hub cache on disk (models--ORG--NAME/{blobs,refs,snapshots}), as huggingface_hub
writes it, filled from local folders: the hub tests resolve ids from it without any network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # 40 hex digits, like a git commit


def add_snapshot(
    cache: Path, repo_id: str, folder: Path, commit: str, ref: str | None = "main", kind: str = "models"
) -> Path:
    """Copy `folder`'s files into `cache` as blobs (named by their sha256, as for LFS files) with
    snapshots/<commit>/<path> symlinks to them, and point refs/<ref> at `commit`; returns the snapshot.
    `kind` is the repo type's folder prefix: models, or datasets."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap
