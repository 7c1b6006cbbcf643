"""Crash-safe file output: atomic writes, staged output directories, SHA-256 of files.

A stage writes into `<out>.partial/` and renames it to `<out>` only when everything, manifest included,
is on disk; so a later stage never mistakes a half-written directory for a finished one. The readers
(`read_text`, `read_lines`, `read_json_object`, `iter_jsonl`) decrypt encrypted files (lmforge.crypt).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge import crypt
from lmforge.crypt import fsync_dir
from lmforge.errors import DataError, LmforgeError

_CHUNK = 1 << 20


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` in plaintext so that readers see either the old file or the whole new one."""
    crypt.write_bytes(path, data, encrypt=False)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline: byte-identical for identical content."""
    crypt.write_json(path, obj, encrypt=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def partial_dir(final: Path) -> Path:
    """Where a stage stages its output before the final rename (deterministic so reruns can resume)."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def check_output(final: Path, overwrite: bool) -> None:
    """Fail before the work, not after it: the output must be new (or `overwrite`) and its parent
    writable. Stages that do their work before opening `staged_output` call this first."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise LmforgeError(f"{final} already exists; pass overwrite=true to replace it")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"output: cannot create {parent} ({e.strerror})") from None
    try:  # a real write: os.access says yes to root even where nothing can be created (/proc)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise LmforgeError(f"output: cannot write in {parent} ({e.strerror})") from None


@contextmanager
def staged_output(final: Path, *, overwrite: bool = False, resume: bool = True) -> Iterator[Path]:
    """Yield a staging directory for `final`; on a clean exit, swap it into place atomically.

    An existing finished `final` is an error unless `overwrite`. A leftover staging directory from a
    crashed run is kept when `resume` (the stage decides what in it is reusable) and wiped otherwise.
    On an exception the staging directory is left for a later resume; `final` is never touched.
    """
    final = Path(final)
    check_output(final, overwrite)
    stage = partial_dir(final)
    if stage.exists() and not resume:
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    yield stage
    publish_dir(stage, final)


def publish_dir(stage: Path, final: Path) -> None:
    """Swap a finished staging directory into place: the old `final` (if any) is moved aside first and
    removed only after the rename, so a crash in between leaves one complete directory, never none."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def read_text(path: Path | str, what: str, error: type[LmforgeError] = DataError) -> str:
    """A UTF-8 text file; missing or undecodable is `error` naming `what` (the config key) and the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: {path} not found")
    try:
        return crypt.read_text(path)  # decrypted when encrypted (lmforge.crypt), as every reader here
    except UnicodeDecodeError as e:
        raise error(f"{what}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_lines(
    path: Path | str,
    what: str,
    *,
    comments: bool = True,
    strip: bool = True,
    error: type[LmforgeError] = DataError,
) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line of a UTF-8 text file, stripped when `strip` (`#` lines
    skipped when `comments`); a missing or undecodable file raises `error` naming `what` (the config key) and the file."""
    text = read_text(path, what, error)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        bare = line.strip()
        if bare and not (comments and bare.startswith("#")):
            out.append((n, bare if strip else line))
    return out


def read_json_object(path: Path, missing: str, error: type[LmforgeError] = DataError) -> dict[str, Any]:
    """A JSON file holding an object; `missing` says what the file is for when it is absent."""
    try:
        data = json.loads(crypt.read_text(path))
    except FileNotFoundError:
        raise error(f"{path}: not found ({missing})") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; DataError naming file:line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with crypt.open_read(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            yield n, rec
