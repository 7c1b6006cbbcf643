"""`lmforge crypt keygen|encrypt|decrypt|rotate`: keys and encryption at rest for existing folders.

    lmforge crypt keygen secret.key                       # 32 random bytes as hex, mode 0600
    lmforge crypt encrypt runs/demo/pretrain encryption.key_file=secret.key
    lmforge crypt rotate runs/demo/pretrain encryption.key_file=secret.key new_key_file=new.key
    lmforge crypt decrypt runs/demo/pretrain encryption.key_file=new.key

`encrypt` seals the files that writers seal when a key is set (SEALED: weights, tokenizer vocabularies,
token shards, curated documents, the curation report); `decrypt` opens every encrypted file; `rotate`
rewraps each file's data key under a new key without re-encrypting the data (the segments are copied byte
for byte). Each file is replaced atomically, then the hashes that list it (index.json of a tokens
directory, a checkpoint's files.json, every manifest.json in or up to two folders above DIR) are updated,
so `lmforge data verify` passes again without the key. Before a file is changed it is checked: a
plaintext file against its manifest entry, an encrypted one by authenticating every segment. An
interrupted run leaves every file whole (old or new); run the same command again to finish it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from lmforge import crypt
from lmforge.errors import ConfigError, IntegrityError
from lmforge.io import atomic_write_json, sha256_file
from lmforge.model.integrity import FILE_LIST, MANIFEST, MAX_DEPTH, file_problem, list_digest, read_file_list

# What `encrypt` seals, as the writers do (lmforge.crypt): file name patterns, relative to a stage root
# for the last two (prepare's report quotes sample documents).
SEALED = ("*.safetensors", "tokenizer.json", "*.bin", "docs-*.jsonl.zst", "batch-*.jsonl.zst")
PREPARE_REPORTS = ("report.json", "report.md")


def _is_sealed_kind(path: Path, root: Path) -> bool:
    if any(fnmatch(path.name, pattern) for pattern in SEALED):
        return True
    if path.name in PREPARE_REPORTS and (path.parent / MANIFEST).is_file():
        try:
            return json.loads((path.parent / MANIFEST).read_text("utf-8")).get("stage") == "prepare"
        except (OSError, ValueError):
            return False
    return False


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ConfigError(f"DIR {root}: not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _authenticate(path: Path, key: bytes) -> None:
    """Read every segment of `path` (IntegrityError on the first that does not authenticate)."""
    reader = crypt.EncryptedReader(path, key)
    try:
        for n in range(reader.segments):
            reader.pread(n * reader.segment, 1)
    finally:
        reader.close()


def _entries(root: Path) -> dict[Path, dict[str, Any]]:
    """Each file's recorded (sha256, bytes) from the manifests covering `root` (the nearest wins)."""
    found: dict[Path, dict[str, Any]] = {}
    for m in _manifests(root):
        for rel, meta in json.loads(m.read_text("utf-8")).get("files", {}).items():
            found.setdefault((m.parent / rel).absolute(), meta)
    for fl in sorted(root.rglob(FILE_LIST)):
        for name, meta in read_file_list(fl.parent).items():
            found[(fl.parent / name).absolute()] = meta
    return found


def _manifests(root: Path) -> list[Path]:
    here = root.absolute()
    above = [p / MANIFEST for p in here.parents[:MAX_DEPTH] if (p / MANIFEST).is_file()]
    return sorted(here.rglob(MANIFEST), key=lambda p: -len(p.parts)) + above


def _check_plain(path: Path, entries: dict[Path, dict[str, Any]]) -> None:
    entry = entries.get(path.absolute())
    problem = file_problem(path, entry) if entry is not None else None
    if problem is not None:
        raise IntegrityError(f"{problem}; not changing it (lmforge data verify names every such file)")


def _update_records(root: Path, changed: set[Path]) -> None:
    """Rewrite every hash that lists a changed file: index.json, then files.json, then manifest.json
    (innermost first; each rewrite is itself a change the next level records)."""

    def fresh(path: Path) -> dict[str, Any]:
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    for index in sorted(root.rglob("index.json")):
        data = json.loads(index.read_text("utf-8"))
        shards = [s for split in (data.get("splits") or {}).values() for s in split.get("shards", [])]
        hit = [s for s in shards if (index.parent / s["file"]).absolute() in changed]
        for s in hit:
            s["sha256"] = sha256_file(index.parent / s["file"])
        if hit:
            atomic_write_json(index, data)
            changed.add(index.absolute())
    for fl in sorted(root.rglob(FILE_LIST)):
        files = read_file_list(fl.parent)
        hit = [n for n in files if (fl.parent / n).absolute() in changed]
        if hit:
            files.update({n: fresh(fl.parent / n) for n in hit})
            body = {"version": 1, "files": dict(sorted(files.items()))}
            atomic_write_json(fl, {**body, "manifest_sha256": list_digest(body)})
            changed.add(fl.absolute())
    for m in _manifests(root):
        data = json.loads(m.read_text("utf-8"))
        hit = [rel for rel in data.get("files", {}) if (m.parent / rel).absolute() in changed]
        if hit:
            data["files"].update({rel: fresh(m.parent / rel) for rel in hit})
            atomic_write_json(m, data)
            changed.add(m.absolute())


def _each(root: Path, files: Iterable[Path], step: Callable[[Path], bool], verb: str) -> int:
    changed: set[Path] = set()
    files, tty = list(files), sys.stderr.isatty()
    for n, path in enumerate(files, 1):
        if step(path):
            changed.add(path.absolute())
        if tty:
            print(f"\r{verb} {n}/{len(files)} files", end="", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    count = len(changed)
    _update_records(root, changed)
    return count


HELP = {
    "encrypt": "Seal DIR's weights, tokenizer vocabularies, token shards and curated documents in place with "
    "the key (each file checked against its manifest first), then update the manifests.",
    "decrypt": "Decrypt every encrypted file of DIR in place (each authenticated first), then update the "
    "manifests. The files are plaintext on disk afterwards.",
    "rotate": "Rewrap the data key of every encrypted file of DIR under new_key_file (the data is not "
    "re-encrypted), then update the manifests.",
}


def _key_args(argv: list[str], prog: str, extra: str | None = None) -> tuple[Path, bytes, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog=f"lmforge crypt {prog}",
        description=HELP[prog]
        + f" The key: encryption.key_file=FILE or ${crypt.KEY_ENV} (docs/encryption.md).",
        epilog=f"example:\n  lmforge crypt {prog} runs/demo/pretrain encryption.key_file=secret.key"
        + (" new_key_file=new.key" if prog == "rotate" else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="a stage's output directory (or a folder in one)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="encryption.key_file=FILE" + (extra or "")
    )
    args = p.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    unknown = set(opts) - {"encryption.key_file", "new_key_file"} or {
        o for o in args.overrides if "=" not in o
    }
    if unknown:
        raise ConfigError(f"crypt {prog}: unknown argument {sorted(unknown)[0]!r} (see --help)")
    kf = opts.get("encryption.key_file")
    key = crypt.read_key_file(Path(kf)) if kf else crypt.env_key()
    if key is None:
        raise ConfigError(f"crypt {prog}: needs encryption.key_file=FILE or {crypt.KEY_ENV}")
    args.opts = opts
    return args.dir, key, args


def encrypt_main(argv: list[str]) -> int:
    root, key, _ = _key_args(argv, "encrypt")
    crypt.restore((key, True))
    entries = _entries(root)

    def step(path: Path) -> bool:
        if not _is_sealed_kind(path, root):
            return False
        if crypt.is_encrypted(path):  # a rerun: already sealed (with this key, and intact)
            _authenticate(path, key)
            return True
        _check_plain(path, entries)
        crypt.transcode(path, encrypt=True)
        return True

    n = _each(root, _files(root), step, "encrypt")
    print(f"crypt encrypt: {n} files sealed in {root}")
    return 0


def decrypt_main(argv: list[str]) -> int:
    root, key, _ = _key_args(argv, "decrypt")
    crypt.restore((key, False))
    sealed = [p for p in _files(root) if crypt.is_encrypted(p)]

    def step(path: Path) -> bool:
        crypt.transcode(path, encrypt=False)  # authenticates every segment before the file is replaced
        return True

    n = _each(root, sealed, step, "decrypt")
    print(f"crypt decrypt: {n} files decrypted in {root} (they are plaintext on disk now)")
    return 0


def rotate_main(argv: list[str]) -> int:
    root, old, args = _key_args(argv, "rotate", "; new_key_file=FILE (required)")
    if "new_key_file" not in args.opts:
        raise ConfigError("crypt rotate: needs new_key_file=FILE (make one: lmforge crypt keygen FILE)")
    new = crypt.read_key_file(Path(args.opts["new_key_file"]))
    new_id = crypt.key_id(new)

    def step(path: Path) -> bool:
        with open(path, "rb") as f:
            kid = f.read(crypt.HEADER)[19:35]
        if kid == new_id:  # a rerun: already rewrapped
            _authenticate(path, new)
        else:
            _authenticate(path, old)
            crypt.rewrap(path, old, new)
        return True

    sealed = [p for p in _files(root) if crypt.is_encrypted(p)]
    n = _each(root, sealed, step, "rotate")
    print(
        f"crypt rotate: {n} data keys rewrapped in {root} (data not re-encrypted); keep the old key until done"
    )
    return 0


def keygen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmforge crypt keygen",
        description="Write a new random 256-bit key as 64 hex digits to FILE (mode 0600, never overwritten). "
        "Use it as encryption.key_file=FILE, or export LMFORGE_KEY=$(cat FILE).",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    path = p.parse_args(argv).file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"crypt keygen: {path} already exists; it is not overwritten (a lost key loses the data)"
        ) from None
    except OSError as e:
        raise ConfigError(f"crypt keygen: cannot create {path} ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    print(
        f"wrote {path} (key id {crypt.key_id(crypt.read_key_file(path)).hex()}); back it up: without it the data is lost"
    )
    return 0
