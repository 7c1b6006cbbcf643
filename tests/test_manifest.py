"""Manifests catch every single-byte flip, truncation and missing file, and name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.manifest import verify_manifest, write_manifest
from lmforge.errors import IntegrityError


def make_dir(tmp_path: Path) -> Path:
    d = tmp_path / "stage"
    (d / "shards").mkdir(parents=True)
    (d / "shards" / "a.bin").write_bytes(bytes(range(256)) * 2)
    (d / "report.json").write_text('{"docs": 3}\n')
    write_manifest(d, stage="test")
    return d


def test_clean_directory_verifies(tmp_path: Path) -> None:
    m = verify_manifest(make_dir(tmp_path))
    assert set(m["files"]) == {"shards/a.bin", "report.json"}


def test_every_single_byte_flip_is_caught(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    target = d / "shards" / "a.bin"
    original = target.read_bytes()
    for i in range(len(original)):
        flipped = bytearray(original)
        flipped[i] ^= 0x01
        target.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError, match=r"shards/a\.bin: SHA-256 differs"):
            verify_manifest(d)
    target.write_bytes(original)
    verify_manifest(d)


def test_truncated_and_missing_files_are_named(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    (d / "shards" / "a.bin").write_bytes(b"short")
    (d / "report.json").unlink()
    with pytest.raises(IntegrityError) as e:
        verify_manifest(d)
    assert "a.bin: 5 bytes, manifest says 512" in str(e.value) and "report.json: missing" in str(e.value)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_dir(tmp_path)
    assert main(["data", "verify", str(d)]) == 0
    assert "2 files" in capsys.readouterr().out
    (d / "report.json").write_text('{"docs": 4}\n')
    assert main(["data", "verify", str(d)]) == 3
    assert "report.json" in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path / "nothing")]) == 3


def test_a_malformed_entry_is_named(tmp_path: Path) -> None:
    import json

    (tmp_path / "a.txt").write_text("x")
    write_manifest(tmp_path, stage="test")
    m = json.loads((tmp_path / "manifest.json").read_text())
    del m["files"]["a.txt"]["bytes"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"files\['a.txt'\] needs 'bytes'"):
        verify_manifest(tmp_path)
