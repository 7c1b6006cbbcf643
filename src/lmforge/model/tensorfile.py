"""Every safetensors file lmforge reads or writes goes through here, so that encryption at rest
(lmforge.crypt) covers checkpoints, model folders, adapters and caches alike.

A plaintext file is written and read exactly as before (`save_file` / `load_file`: same bytes, memory
mapped). An encrypted one is built in memory (`safetensors.torch.save`) and sealed as it streams to disk;
loading decrypts it into memory and parses it there: no plaintext copy ever touches the disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from lmforge import crypt


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, decrypted when it is encrypted."""
    if crypt.is_encrypted(path):
        return load(crypt.read_bytes(path))
    return load_file(str(path))


def save_tensors(
    tensors: dict[str, torch.Tensor],
    path: Path | str,
    metadata: dict[str, str] | None = None,
    encrypt: bool | None = None,
) -> None:
    """Write a safetensors file atomically; sealed when `encrypt` (by default: when a key is set)."""
    if crypt.encrypting() if encrypt is None else encrypt:
        crypt.write_bytes(path, save(tensors, metadata=metadata), encrypt=True)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_metadata(path: Path | str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (from its header alone when plaintext)."""
    with crypt.open_read(path) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
