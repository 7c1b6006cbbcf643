"""Token shards: the on-disk format `lmforge tokenize` writes and pretraining reads.

A tokens directory holds flat little-endian arrays of token ids, documents each followed by EOS:

    train-00000.bin, train-00001.bin, ...   uint16 when vocab_size <= 65,536, else uint32
    val-00000.bin, ...
    index.json      dtype, vocab size, EOS/BOS ids, tokenizer SHA-256 and, per split, token / document /
                    source-byte counts and each shard's token count and SHA-256
    tokenizer/      a copy of the tokenizer, so the directory is self-contained
    config.yaml, manifest.json

Read a split with `ShardSet(directory, "train")`: one read-only `np.memmap` per shard, checked against the
index (sizes always, SHA-256 when `verify`). The pretraining sampler is built on top of `ShardSet.arrays`.
An encrypted shard (lmforge.crypt) is a `SealedTokens` instead: slices decrypt only the segments they
touch, so the sampler reads at random offsets without a plaintext copy on disk; the index records the
ciphertext's SHA-256, so `lmforge data verify` checks it without the key.

    python -c "from lmforge.data.shards import ShardSet; print(ShardSet('runs/demo/tokens').num_tokens)"
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import crypt
from lmforge.errors import DataError, IntegrityError
from lmforge.io import sha256_file

INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
VERSION = 1
SPLITS = ("train", "val")
_DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids 0..65,535, so it serves every vocabulary of at most 65,536 tokens."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def doc_fraction(doc_id: str, seed: int) -> float:
    """A stable number in [0, 1) per (seed, document id): the same on every machine, run and Python.

    `tokenize` puts a document in validation when this is below `val_fraction`; `tokenizer train` holds out
    documents the same way, so with equal seed and fractions the tokenizer never saw the validation text.
    """
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class SealedTokens:
    """A 1-D token array over an encrypted shard, sliced like the memmap it replaces (`a[i:j]`, `len(a)`)."""

    def __init__(self, path: Path, dtype: np.dtype[Any]) -> None:
        self.reader = crypt.EncryptedReader(path)
        self.dtype = dtype
        self.length = self.reader.size // dtype.itemsize

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("SealedTokens supports contiguous slices only")
        start, stop, _ = item.indices(self.length)
        size = self.dtype.itemsize
        return np.frombuffer(self.reader.pread(start * size, max(0, stop - start) * size), dtype=self.dtype)


def read_index(directory: Path) -> dict[str, Any]:
    """Load and sanity-check `index.json`, raising DataError that names the file and the bad key."""
    path = Path(directory) / INDEX
    if not path.is_file():
        raise DataError(
            f"{path}: not found; is {directory} a tokens directory written by `lmforge tokenize`?"
        )
    try:
        index = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(index, dict):
        raise DataError(f"{path}: expected a JSON object")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: version {index.get('version')!r}, this lmforge reads version {VERSION}")
    if index.get("dtype") not in _DTYPES:
        raise DataError(f"{path}: dtype {index.get('dtype')!r}, expected one of {sorted(_DTYPES)}")
    for key in ("vocab_size", "eos_id", "bos_id"):
        if not isinstance(index.get(key), int):
            raise DataError(f"{path}: key {key!r} missing or not an integer")
    if not isinstance(index.get("splits"), dict):
        raise DataError(f"{path}: key 'splits' missing or not an object")
    return index


class ShardSet:
    """One split of a tokens directory as a list of read-only memory maps, checked against `index.json`."""

    def __init__(self, directory: Path | str, split: str = "train", verify: bool = True) -> None:
        self.directory = Path(directory)
        self.split = split
        index = read_index(self.directory)
        where = self.directory / INDEX
        splits = index["splits"]
        if split not in splits:
            raise DataError(f"{where}: no split {split!r}; it has {sorted(splits)}")
        info = splits[split]
        try:
            shards = [(str(s["file"]), int(s["tokens"]), str(s["sha256"])) for s in info["shards"]]
            self.num_tokens = int(info["tokens"])
            self.num_documents = int(info["documents"])
            self.num_bytes = int(info["bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: split {split!r} is malformed (missing or bad key {e})") from e
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.bos_id: int = index["bos_id"]
        self.dtype = _DTYPES[index["dtype"]]
        self.tokenizer_dir = self.directory / TOKENIZER_DIR
        if sum(t for _, t, _ in shards) != self.num_tokens:
            raise DataError(f"{where}: split {split!r} shard token counts do not add up to {self.num_tokens}")
        self.arrays: list[Any] = []  # np.memmap, or SealedTokens for an encrypted shard
        for name, tokens, sha in shards:
            path = self.directory / name
            if not path.is_file():
                raise IntegrityError(f"{path}: shard listed in {INDEX} is missing")
            size = crypt.plain_size(path)
            if size != tokens * self.dtype.itemsize:
                raise IntegrityError(
                    f"{path}: {size} bytes, {INDEX} says {tokens} tokens x {self.dtype.itemsize} bytes "
                    f"= {tokens * self.dtype.itemsize} (truncated or extended)"
                )
            if verify and sha256_file(path) != sha:
                raise IntegrityError(f"{path}: SHA-256 differs from {INDEX} (file changed or corrupted)")
            # np.memmap refuses empty files; an empty shard is never written, but stay safe.
            if crypt.is_encrypted(path):
                self.arrays.append(SealedTokens(path, self.dtype))
            else:
                self.arrays.append(
                    np.memmap(path, dtype=self.dtype, mode="r") if tokens else np.zeros(0, self.dtype)
                )

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.directory)!r}, {self.split!r}: {self.num_tokens:,} tokens, "
            f"{self.num_documents:,} documents, {len(self.arrays)} shards, {self.dtype.name})"
        )


__all__ = [
    "INDEX",
    "SPLITS",
    "TOKENIZER_DIR",
    "SealedTokens",
    "ShardSet",
    "doc_fraction",
    "dtype_for_vocab",
    "read_index",
    "shard_file",
]
