"""Integrity of everything a command loads: each file is checked against the SHA-256 its writer recorded
before any of it is used, so a flipped byte is an IntegrityError (exit 3) naming the file, never weights
or a vocabulary used silently.

    with load_scope():                                       # one load: each notice printed once
        verify_files(folder, ["model_config.json", "model.safetensors"])   # the files about to be read

Where the recorded hashes come from, nearest first:
- `files.json` in the folder itself: a training checkpoint (train/checkpoint.py writes it, self-hashed);
- `manifest.json` in the folder or up to MAX_DEPTH folders above it that lists files under it: every
  lmforge stage writes one at its output root (a run dir's covers model/, adapter/ and checkpoints/, a
  tokens dir's its tokenizer/; quantize, lora merge, export and tokenizer train cover their folder).
A folder with neither (an HF download, a PEFT adapter) loads with one "no manifest: not verified" notice.
LMFORGE_NO_VERIFY=1 skips every check here, with a warning on stderr. Hashing is streamed (1 MiB chunks).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lmforge.errors import IntegrityError
from lmforge.io import sha256_file

MANIFEST = "manifest.json"  # a stage's output root (data/manifest.py writes it)
FILE_LIST = "files.json"  # a checkpoint's own list (train/checkpoint.py writes it)
NO_VERIFY = "LMFORGE_NO_VERIFY"
MAX_DEPTH = 2  # <run>/checkpoints/step-N is the deepest folder a stage's manifest covers
CHECKPOINT_STATE = "state.json"  # written last into a checkpoint's temp dir: its presence means complete
CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)  # what a damaged file raises

# What the current load already reported on (folders, the skip warning) or verified ("ok:<file>");
# None outside `load_scope`.
_TOLD: ContextVar[set[str] | None] = ContextVar("lmforge_integrity_told", default=None)


@contextmanager
def load_scope() -> Iterator[None]:
    """One load (model + adapter + tokenizer): each notice or warning is printed once inside it."""
    if _TOLD.get() is not None:
        yield
        return
    token = _TOLD.set(set())
    try:
        yield
    finally:
        _TOLD.reset(token)


def _tell(key: str, message: str) -> None:
    told = _TOLD.get()
    if told is not None:
        if key in told:
            return
        told.add(key)
    print(message, file=sys.stderr)


def skipped() -> bool:
    """Whether the user turned verification off (LMFORGE_NO_VERIFY=1); warns on stderr when so."""
    if os.environ.get(NO_VERIFY, "").strip().lower() not in ("1", "true", "yes"):
        return False
    _tell(NO_VERIFY, f"warning: {NO_VERIFY}=1: models, checkpoints and tokenizers are loaded unverified")
    return True


# -- manifest.json (every stage's output root) ----------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    """`root/manifest.json`, its shape checked; IntegrityError naming it when absent or malformed."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path}: no manifest; was this directory written by a finished lmforge stage?")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path}: key 'files' missing or not an object")
    for rel, meta in manifest["files"].items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str)
        ):
            raise IntegrityError(f"{path}: files[{rel!r}] needs 'bytes' (an integer) and 'sha256' (a string)")
    return manifest


def file_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with `path` against its manifest entry (one line naming it), or None."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or extended)"
    if sha256_file(path) != entry["sha256"]:
        return f"{path}: SHA-256 differs from the manifest (file changed or corrupted)"
    return None


def covering_manifest(folder: Path) -> tuple[Path, str, dict[str, Any]] | None:
    """(manifest path, the folder's prefix in it, its file entries) of the nearest manifest.json that lists
    files of `folder`: the folder's own, or that of the stage output it lies in (its run, its tokens dir)."""
    here = Path(folder).absolute()
    for depth, root in enumerate([here, *here.parents][: MAX_DEPTH + 1]):
        if not (root / MANIFEST).is_file():
            continue
        files: dict[str, Any] = read_manifest(root)["files"]
        prefix = "" if depth == 0 else here.relative_to(root).as_posix() + "/"
        if depth == 0 or any(rel.startswith(prefix) for rel in files):
            return root / MANIFEST, prefix, files
    return None


# -- files.json (a checkpoint's own list) ---------------------------------------------------------------
def list_digest(body: dict[str, Any]) -> str:
    """The hash files.json records of its own body, so a damaged list is told apart from damaged data."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_file_list(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of checkpoint `path`'s files.json, after checking its self-hash."""
    file = Path(path) / FILE_LIST
    try:
        data = json.loads(file.read_text("utf-8"))
        body = {"version": data["version"], "files": data["files"]}
        ok = data["manifest_sha256"] == list_digest(body)
        files: dict[str, dict[str, Any]] = dict(data["files"])
        for entry in files.values():
            ok = ok and isinstance(entry["sha256"], str) and isinstance(entry["bytes"], int)
    except (*_UNREADABLE, AttributeError) as e:
        raise IntegrityError(f"{file}: unreadable checkpoint manifest ({type(e).__name__})") from None
    if not ok:
        raise IntegrityError(f"{file}: checksum mismatch; the manifest changed after it was written")
    return files


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (a run's `checkpoints/` dir), oldest first: the one rule that the
    trainer (resume, pruning) and the model resolver share."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir() and (p / CHECKPOINT_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def verify_checkpoint(path: Path, *, names: Iterable[str] | None = None, rank: int = 0) -> None:
    """Check checkpoint `path` against its files.json (streamed, bounded memory): every file, or only
    `names` (what a model load reads: not the optimizer state a resume needs).

    Any changed, missing, extra or unreadable file is an IntegrityError naming it. A checkpoint saved
    before lmforge wrote files.json loads unverified, with a note on stderr (rank 0 only)."""
    path = Path(path)
    if skipped():
        return
    if not (path / FILE_LIST).is_file():
        if rank == 0:
            note = f"note: {path} has no {FILE_LIST} (saved by an older lmforge); loading it unverified"
            _tell(str(path.absolute()), note)
        return
    files = read_file_list(path)
    wanted = sorted(files) if names is None else sorted(set(names))
    for name in wanted:
        file = path / name
        if name not in files:
            raise IntegrityError(f"{file}: not listed in {path / FILE_LIST}; the checkpoint was altered")
        entry = files[name]
        if Path(name).name != name or not file.is_file():
            raise IntegrityError(f"{file}: missing; listed in {path / FILE_LIST}")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise IntegrityError(f"{file}: SHA-256 mismatch; the file changed after the checkpoint was saved")
    if names is None:
        for file in sorted(path.iterdir()):
            if file.name != FILE_LIST and file.name not in files:
                raise IntegrityError(f"{file}: not listed in {path / FILE_LIST}; the checkpoint was altered")


# -- what the loaders call ------------------------------------------------------------------------------
def verify_files(folder: Path, names: Iterable[str]) -> None:
    """Check the files of `folder` a loader is about to read (`names`, those that exist) against the
    record covering the folder: its files.json, else the nearest manifest.json listing it. A named file
    the record does not list is refused too (it was added afterwards). No record: one notice, no check."""
    folder = Path(folder)
    told = _TOLD.get()
    done = told if told is not None else set()  # files already checked in this load are not hashed again
    present = sorted(
        {n for n in names if (folder / n).is_file() and f"ok:{(folder / n).absolute()}" not in done}
    )
    if skipped() or not present:
        return
    if (folder / FILE_LIST).is_file():
        verify_checkpoint(folder, names=present)
        return
    found = covering_manifest(folder)
    if found is None:
        _tell(str(folder.absolute()), f"note: {folder}: no manifest: not verified")
        return
    manifest, prefix, files = found
    for name in present:
        entry = files.get(prefix + name)
        if entry is None:
            raise IntegrityError(
                f"{folder / name}: not listed in {manifest}; the folder changed after it was written"
            )
        problem = file_problem(folder / name, entry)
        if problem is not None:
            raise IntegrityError(f"{problem} ({manifest})")
    done.update(f"ok:{(folder / name).absolute()}" for name in present)


__all__ = [
    "FILE_LIST",
    "MANIFEST",
    "MAX_DEPTH",
    "NO_VERIFY",
    "covering_manifest",
    "file_problem",
    "list_digest",
    "load_scope",
    "read_file_list",
    "read_manifest",
    "skipped",
    "verify_checkpoint",
    "verify_files",
]
