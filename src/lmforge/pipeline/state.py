"""What a pipeline ran, and whether a stage must run again: hashes of its config, inputs and output.

The state file (JSON, written atomically after every stage) holds per stage:
    {"status": "done" | "failed", "config_sha256": ..., "inputs": {path: digest}, "output": path,
     "output_digest": ..., "exit_code": ..., "seconds": ...}
A digest is the SHA-256 of a directory's manifest.json (every stage writes one), of a file's bytes, or,
for a directory without a manifest, of its listing (path, size, mtime): cheap on large raw inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_json, sha256_file
from lmforge.model.integrity import MANIFEST
from lmforge.pipeline.spec import Stage

VERSION = 1


def digest(path: Path) -> str | None:
    """A fingerprint of a file or directory (see the module doc); None when it does not exist."""
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        return "manifest:" + sha256_file(path / MANIFEST)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()


def config_sha256(stage: Stage) -> str:
    text = json.dumps({"command": stage.command, **stage.config_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return []


def input_digests(stage: Stage, workdir: Path) -> dict[str, str]:
    """{path: digest} of every existing file or folder the stage's config names, other than its output."""
    output = (workdir / stage.output).resolve() if stage.output else None
    found: dict[str, str] = {}
    for value in _strings(stage.config_dict()):
        if not value or "\n" in value or len(value) > 4096:
            continue
        path = (workdir / value).resolve()
        if output is not None and (path == output or output in path.parents):
            continue
        d = digest(path) if path.exists() else None
        if d is not None:  # named as the config wrote it; a path under workdir (the usual) relative to it
            found[path.relative_to(workdir).as_posix() if workdir in path.parents else value] = d
    return found


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """The stages recorded in state file `path` ({} when there is none yet)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
        stages = data["stages"]
        assert isinstance(stages, dict)
    except (OSError, ValueError, KeyError, AssertionError):
        raise ConfigError(f"{path}: not a pipeline state file; delete it to run every stage again") from None
    return stages


def save_state(path: Path, stages: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"version": VERSION, "stages": stages})


def why_run(stage: Stage, record: dict[str, Any] | None, workdir: Path) -> str | None:
    """Why `stage` must run given its last record, or None when it is up to date."""
    if stage.output is None:
        return "it has no output to check (runs every time)"
    if record is None:
        return "it never ran"
    if record.get("status") != "done":
        return f"it failed last time (exit {record.get('exit_code')})"
    if record.get("config_sha256") != config_sha256(stage):
        return "its config changed"
    now = input_digests(stage, workdir)
    before: dict[str, str] = record.get("inputs", {})
    for key in sorted(now.keys() | before.keys()):
        if now.get(key) != before.get(key):
            return f"input {key} changed"
    out = digest(workdir / stage.output)
    if out is None:
        return f"its output {stage.output} is missing"
    if out != record.get("output_digest"):
        return f"its output {stage.output} changed since the pipeline wrote it"
    return None
