"""The curated-document format that `prepare` writes and `tokenizer train` / `tokenize` read.

A curated directory holds `docs-00000.jsonl.zst`, `docs-00001.jsonl.zst`, ... : zstd-compressed JSON
lines `{"id": str, "text": str, "source": str}` in a deterministic order, plus report.json, report.md,
config.yaml and manifest.json. Shards rotate at `shard_bytes` of uncompressed JSON so readers can
work on shards in parallel. The same documents always give byte-identical files (single-threaded zstd,
fixed level, sorted JSON keys).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from lmforge import crypt
from lmforge.errors import DataError

PATTERN = "docs-*.jsonl.zst"
LEVEL = 10


def shard_name(index: int) -> str:
    return f"docs-{index:05d}.jsonl.zst"


class CuratedWriter:
    """Append documents; shards are closed at `shard_bytes` of uncompressed JSON lines."""

    def __init__(self, directory: Path, shard_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.shards: list[Path] = []
        self.documents = 0
        self._buf = io.BytesIO()

    def write(self, doc: dict[str, Any]) -> None:
        line = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n"
        self._buf.write(line)
        self.documents += 1
        if self._buf.tell() >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._buf.tell() == 0:
            return
        path = self.directory / shard_name(len(self.shards))
        data = zstandard.ZstdCompressor(level=LEVEL).compress(self._buf.getvalue())
        crypt.write_bytes(path, data)  # sealed when a key is set (lmforge.crypt)
        self.shards.append(path)
        self._buf = io.BytesIO()

    def close(self) -> list[Path]:
        self._flush()
        return self.shards

    def __enter__(self) -> CuratedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


def curated_shards(directory: Path) -> list[Path]:
    shards = sorted(Path(directory).glob(PATTERN))
    if not shards:
        raise DataError(f"{directory}: no curated shards ({PATTERN}); run `lmforge prepare` first")
    return shards


def iter_shard(path: Path) -> Iterator[dict[str, Any]]:
    with crypt.open_read(path) as f, zstandard.ZstdDecompressor().stream_reader(f) as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text'")
            yield doc


def iter_curated(directory: Path) -> Iterator[dict[str, Any]]:
    """Every document of a curated directory, in order."""
    for shard in curated_shards(directory):
        yield from iter_shard(shard)
