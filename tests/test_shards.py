"""ShardSet: memory maps that match the index, and a clear error for every way a tokens dir can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.shards import ShardSet, doc_fraction, dtype_for_vocab
from lmforge.data.tokenize import TokenizeConfig, run
from lmforge.errors import DataError, IntegrityError
from lmforge.tokenizer import train_tokenizer
from tokenizer_corpus import shakespeare_docs, write_curated


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    docs = shakespeare_docs(files=2)
    curated = write_curated(root / "curated", docs)
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=512)
    tok.save(root / "tok")
    from lmforge.data.manifest import write_manifest

    write_manifest(root / "tok", stage="tokenizer train")
    cfg = TokenizeConfig(input=curated, tokenizer=root / "tok", output=root / "tokens", shard_tokens=20_000)
    run(cfg)
    return root / "tokens"


@pytest.fixture
def copy(tokens: Path, tmp_path: Path) -> Path:
    shutil.copytree(tokens, tmp_path / "t")
    return tmp_path / "t"


def test_arrays_are_readonly_memmaps_matching_the_index(tokens: Path) -> None:
    s = ShardSet(tokens)
    index = json.loads((tokens / "index.json").read_text())["splits"]["train"]
    assert [len(a) for a in s.arrays] == [sh["tokens"] for sh in index["shards"]]
    assert sum(len(a) for a in s.arrays) == s.num_tokens == index["tokens"] > 60_000
    assert all(isinstance(a, np.memmap) and not a.flags.writeable and a.ndim == 1 for a in s.arrays)
    assert int(max(a.max() for a in s.arrays)) < s.vocab_size == 512
    eos_count = sum(int((a == s.eos_id).sum()) for a in s.arrays)
    assert eos_count == s.num_documents == index["documents"]  # ids < vocab; EOS only between documents
    assert "train" in repr(s) and s.dtype == np.uint16


def test_dtype_boundary() -> None:
    assert [dtype_for_vocab(v) for v in (256, 65_535, 65_536, 65_537, 200_000)] == [
        "uint16",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]


def test_doc_fraction_is_stable_and_uniform() -> None:
    assert doc_fraction("hamlet/3", 0) == doc_fraction("hamlet/3", 0) != doc_fraction("hamlet/3", 1)
    values = [doc_fraction(str(i), 7) for i in range(20_000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(sum(v < 0.05 for v in values) / 20_000 - 0.05) < 0.005


def test_missing_split_and_bad_index(copy: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'test'; it has \['train', 'val'\]"):
        ShardSet(copy, "test")
    (copy / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"index.json: not valid JSON"):
        ShardSet(copy)
    (copy / "index.json").write_text(json.dumps({"version": 1, "dtype": "int8"}))
    with pytest.raises(DataError, match=r"dtype 'int8', expected one of \['uint16', 'uint32'\]"):
        ShardSet(copy)
    with pytest.raises(DataError, match=r"not found; is .* a tokens directory"):
        ShardSet(copy / "nothing")


def test_truncated_missing_and_corrupted_shards(copy: Path) -> None:
    shard = copy / "train-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(
        IntegrityError, match=r"train-00001.bin: 39998 bytes, index.json says 20000 tokens x 2"
    ):
        ShardSet(copy, verify=False)
    flipped = bytearray(data)
    flipped[100] ^= 1
    shard.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match=r"train-00001.bin: SHA-256 differs"):
        ShardSet(copy)
    assert ShardSet(copy, verify=False).num_tokens > 0  # verify=False trusts content, still checks sizes
    shard.unlink()
    with pytest.raises(IntegrityError, match=r"train-00001\.bin: shard listed in index\.json is missing"):
        ShardSet(copy)
