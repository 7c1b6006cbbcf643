"""Every safetensors file lmforge reads or writes goes through here, so that encryption at rest
(lmforge.crypt) covers checkpoints, model folders, adapters and caches alike.

A plaintext file is written and read exactly as before (`save_file` / `load_file`: same bytes, memory
mapped). An encrypted one is built in memory (`safetensors.torch.save`) and sealed as it streams to disk;
loading decrypts it into one buffer whose views are the tensors: no plaintext copy ever touches the disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from lmforge import crypt

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, decrypted when it is encrypted."""
    if not crypt.is_encrypted(path):
        return load_file(str(path))
    reader = crypt.EncryptedReader(path)
    try:
        buf = bytearray(reader.size)
        reader.readinto(buf)
    finally:
        reader.close()
    return _views(buf)


def _views(buf: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors image as views of `buf` (as `load_file` maps the file): no copy.
    A dtype outside _DTYPES goes through safetensors' own parser."""
    (n,) = struct.unpack_from("<Q", buf)
    header = json.loads(bytes(buf[8 : 8 + n]))
    header.pop("__metadata__", None)
    if any(info["dtype"] not in _DTYPES for info in header.values()):
        return load(bytes(buf))
    out = {}
    for name, info in header.items():
        dtype, (start, end) = _DTYPES[info["dtype"]], info["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = (
            torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        out[name] = flat.reshape(info["shape"])
    return out


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
