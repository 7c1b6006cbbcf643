"""Read raw input for `lmforge prepare`: files, directories, globs and built-in corpora, streamed as documents.

    from lmforge.data.ingest import IngestConfig, expand_inputs, iter_documents
    for item in iter_documents(expand_inputs(["data/*.jsonl.zst", "notes/"]), IngestConfig()):
        ...  # RawDoc (a document) or Skipped (a file or line that could not be used, with the reason)

Formats (by suffix): `.txt`, `.md` and any file named explicitly are one document per file; `.jsonl`,
`.jsonl.gz`, `.jsonl.zst` are one document per line (field `text_field`); `.parquet` is one document per
row (column `text_field`, read in record batches). Hugging Face datasets (a `save_to_disk` folder, an
`.arrow` file, `hf:ORG/NAME[:config][@revision]`; see data/hfdata.py) are one document per row (column
`text_field`, after `hf.columns`), split `hf.split`. Memory is bounded by one text file, one JSON line or one
parquet batch. Binary (NUL bytes) and non-UTF-8 files are skipped and counted with the reason; a malformed
JSON line is reported as `file:line` and skipped, or fatal with `on_bad_line: error`.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard
from pydantic import Field

from lmforge.config import Section
from lmforge.data.demo import demo_files, is_demo
from lmforge.data.hfdata import HFDataConfig, check_columns, column_names, is_hf_source, open_dataset
from lmforge.errors import DataError

_SNIFF = 8192
_GLOB_CHARS = frozenset("*?[")


class IngestConfig(Section):
    text_field: str = Field("text", description="JSONL field / parquet column holding the document text")
    on_bad_line: Literal["skip", "error"] = Field(
        "skip", description="a malformed JSONL line: skip it (reported as file:line) or stop with an error"
    )
    extensions: list[str] = Field(
        [".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"],
        description="file suffixes picked up when an input is a directory (files named explicitly are always read)",
    )
    max_file_mb: float = Field(256.0, description="skip whole-text files larger than this (reason too_large)")
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset inputs: split, columns, streaming"
    )


@dataclass(frozen=True)
class InputFile:
    path: Path
    source: str  # the name documents carry: the path as given, or `demo:<corpus>/<file>`
    hf: bool = False  # a Hugging Face dataset (data/hfdata.py), read row by row


@dataclass(frozen=True)
class RawDoc:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class Skipped:
    where: str  # `file` or `file:line`
    reason: str  # binary, not_utf8, unreadable, too_large, bad_line
    detail: str = ""


def _fmt(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in (
        (".jsonl.gz", "jsonl.gz"),
        (".jsonl.zst", "jsonl.zst"),
        (".jsonl", "jsonl"),
        (".parquet", "parquet"),
    ):
        if name.endswith(suffix):
            return kind
    return "text"


def expand_inputs(specs: str | list[str], extensions: list[str] | None = None) -> list[InputFile]:
    """Every input file, in a deterministic order: specs in the given order, each expanded sorted.

    A spec is a file, a directory (walked recursively for `extensions`), a glob (`**` allowed) or a
    built-in corpus `demo:<name>`, or a Hugging Face dataset (`is_hf_source`). A spec that matches
    nothing is an error naming it.
    """
    exts = tuple(e.lower() for e in (extensions or IngestConfig().extensions))
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DataError("input: empty; give a file, directory, glob or demo:shakespeare")
    out: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path, source: str, hf: bool = False) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(InputFile(path, source, hf))

    for spec in specs:
        if is_hf_source(spec):
            add(Path(spec).expanduser(), spec, hf=True)
            continue
        if is_demo(spec):
            for path, source in demo_files(spec):
                add(path, source)
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            add(path, spec)
        elif path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(exts)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not found:
                raise DataError(f"input {spec!r}: directory has no files ending in {', '.join(exts)}")
            for p in found:
                add(p, p.as_posix())
        elif _GLOB_CHARS.intersection(spec):
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"input {spec!r}: glob matches no files")
            for m in matches:
                add(Path(m), Path(m).as_posix())
        else:
            raise DataError(f"input {spec!r}: no such file or directory")
    return out


def _zst_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) zstd file; a truncated last frame raises EOFError.

    zstandard's stream_reader ends quietly on a truncated frame, which would lose documents silently.
    """
    dobj: Any = None  # None between frames
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            while chunk:
                if dobj is None:
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                out = dobj.decompress(chunk)
                if out:
                    yield out
                if dobj.eof:  # the frame ended; the rest of the chunk starts the next one
                    chunk, dobj = dobj.unused_data, None
                else:
                    chunk = b""
    if dobj is not None:
        raise EOFError("zstd stream ends inside a frame (truncated file)")


def _lines(path: Path, kind: str) -> Iterator[bytes]:
    if kind == "jsonl.zst":
        rest = b""
        for chunk in _zst_chunks(path):
            rest += chunk
            *lines, rest = rest.split(b"\n")
            yield from lines
        if rest:
            yield rest
        return
    opener = gzip.open if kind == "jsonl.gz" else open
    with opener(path, "rb") as f:
        yield from f


def _read_text(f: InputFile, cfg: IngestConfig) -> Iterator[RawDoc | Skipped]:
    try:
        size = f.path.stat().st_size
        if size > cfg.max_file_mb * 1e6:
            yield Skipped(f.source, "too_large", f"{size / 1e6:.1f} MB > max_file_mb={cfg.max_file_mb}")
            return
        data = f.path.read_bytes()
    except OSError as e:
        yield Skipped(f.source, "unreadable", e.strerror or str(e))
        return
    if b"\x00" in data[:_SNIFF]:
        yield Skipped(f.source, "binary", "NUL bytes in the first 8 KB")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Skipped(f.source, "not_utf8", f"invalid UTF-8 at byte {e.start}")
        return
    yield RawDoc(f.source, text, f.source)


def _read_jsonl(f: InputFile, kind: str, cfg: IngestConfig) -> Iterator[RawDoc | Skipped]:
    lineno = 0
    try:
        for lineno, line in enumerate(_lines(f.path, kind), 1):
            if not line.strip():
                continue
            problem = ""
            text = None
            try:
                obj = json.loads(line)
                text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    problem = f"no string field {cfg.text_field!r}"
            except ValueError as e:  # UnicodeDecodeError is a ValueError too
                problem = f"not valid JSON ({str(e).splitlines()[0][:80]})"
            if problem or not isinstance(text, str):
                where = f"{f.source}:{lineno}"
                if cfg.on_bad_line == "error":
                    raise DataError(f"{where}: {problem} (set ingest.on_bad_line=skip to skip such lines)")
                yield Skipped(where, "bad_line", problem)
                continue
            yield RawDoc(f"{f.source}:{lineno}", text, f.source)
    except (OSError, EOFError, zstandard.ZstdError) as e:  # unreadable, truncated or corrupt stream
        where = f.source if lineno == 0 else f"{f.source}:{lineno + 1}"
        yield Skipped(where, "unreadable", str(e)[:120])


def _read_parquet(f: InputFile, cfg: IngestConfig) -> Iterator[RawDoc | Skipped]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{f.source}: reading parquet needs pyarrow (pip install 'lmforge[parquet]')") from e
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        yield Skipped(f.source, "unreadable", str(e)[:120])
        return
    if cfg.text_field not in pf.schema_arrow.names:
        yield Skipped(f.source, "unreadable", f"no column {cfg.text_field!r}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[cfg.text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield RawDoc(f"{f.source}:{row}", text, f.source)
            else:
                yield Skipped(f"{f.source}:{row}", "bad_line", f"{cfg.text_field!r} is not a string")


def _read_hf(f: InputFile, cfg: IngestConfig) -> Iterator[RawDoc | Skipped]:
    ds, label = open_dataset(f.source, cfg.hf)
    names = column_names(ds)
    check_columns(f.source, names, {f"hf.columns.{k}": v for k, v in cfg.hf.columns.items()})
    column = cfg.hf.columns.get(cfg.text_field, cfg.text_field)
    check_columns(f.source, names, {"ingest.text_field": column})
    for row, rec in enumerate(ds.select_columns([column]), 1):
        text = rec[column]
        if isinstance(text, str):
            yield RawDoc(f"{label}:{row}", text, f.source)
        else:
            yield Skipped(f"{label}:{row}", "bad_line", f"{column!r} is not a string")


def iter_documents(files: list[InputFile], cfg: IngestConfig) -> Iterator[RawDoc | Skipped]:
    """Documents and skips of every file, in file order then line order."""
    for f in files:
        kind = _fmt(f.path)
        if f.hf:
            yield from _read_hf(f, cfg)
        elif kind == "text":
            yield from _read_text(f, cfg)
        elif kind == "parquet":
            yield from _read_parquet(f, cfg)
        else:
            yield from _read_jsonl(f, kind, cfg)


__all__ = ["IngestConfig", "InputFile", "RawDoc", "Skipped", "expand_inputs", "iter_documents"]
