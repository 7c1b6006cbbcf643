"""`lmforge tokenize`: exact content, split by document, determinism across runs and workers, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main as cli
from lmforge.data.manifest import verify_manifest
from lmforge.data.shards import ShardSet, doc_fraction, read_index
from lmforge.data.tokenize import TokenizeConfig, run
from lmforge.io import partial_dir
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from tokenizer_corpus import shakespeare_docs, write_curated

VAL_FRACTION = 0.05


@pytest.fixture(scope="module")
def docs() -> list[dict[str, str]]:
    return shakespeare_docs()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, docs: list[dict[str, str]]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tokenize")
    curated = write_curated(root / "curated", docs)
    assert cli(["tokenizer", "train", f"input={curated}", f"output={root / 'tok'}", "vocab_size=1024"]) == 0
    return curated, root / "tok"


def make_cfg(inputs: tuple[Path, Path], out: Path, **kw: object) -> TokenizeConfig:
    # Small parts so that the 0.8 MB corpus is 7 work units and resume/parallelism have something to do.
    base: dict[str, object] = {"val_fraction": VAL_FRACTION, "part_bytes": 100_000}
    return TokenizeConfig(input=inputs[0], tokenizer=inputs[1], output=out, **{**base, **kw})  # type: ignore[arg-type]


def data_files(d: Path) -> dict[str, bytes]:
    """Everything but config.yaml (it names the output and worker count) and the manifest that hashes it."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("config.yaml", "manifest.json")
    }


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "tokens"
    stats = run(make_cfg(inputs, out))
    assert stats["run"]["parts"] == 7 and stats["run"]["parts_skipped"] == 0
    return out


def split_docs(arr: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(arr == eos)
    assert len(arr) == 0 or ends[-1] == len(arr) - 1, "every document ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [arr[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_shards_hold_every_document_exactly_once_in_order(
    reference: Path, inputs: tuple[Path, Path], docs: list[dict[str, str]]
) -> None:
    tok = load_tokenizer(inputs[1])
    val_docs = [d for d in docs if doc_fraction(d["id"], 0) < VAL_FRACTION]
    train_docs = [d for d in docs if doc_fraction(d["id"], 0) >= VAL_FRACTION]
    assert len(val_docs) == 5 and len(train_docs) == 119  # 4%: small-sample noise around 5%
    for split, expected in (("train", train_docs), ("val", val_docs)):
        s = ShardSet(reference, split)
        assert s.dtype == np.uint16 and s.vocab_size == 1024 and (s.eos_id, s.bos_id) == (0, 1)
        assert s.num_documents == len(expected)
        assert s.num_bytes == sum(len(d["text"].encode()) for d in expected)
        arr = np.concatenate(s.arrays)
        assert s.num_tokens == len(arr) == sum(len(tok.encode(d["text"])) + 1 for d in expected)
        pieces = split_docs(arr, s.eos_id)
        assert [tok.decode(p) for p in pieces] == [d["text"] for d in expected]
        assert s.tokenizer_dir == reference / "tokenizer"
    # The validation documents are exactly the tokenizer's held-out ones when seeds and fractions match.
    assert load_tokenizer(reference / "tokenizer").encode("Exeunt.") == tok.encode("Exeunt.")
    verify_manifest(reference)


def test_index_layout(reference: Path, inputs: tuple[Path, Path]) -> None:
    index = read_index(reference)
    assert index["version"] == 1 and index["dtype"] == "uint16"
    from lmforge.io import sha256_file

    assert index["tokenizer_sha256"] == sha256_file(inputs[1] / "tokenizer.json")
    assert sorted(p.name for p in reference.iterdir()) == [
        "config.yaml",
        "index.json",
        "manifest.json",
        "tokenizer",
        "train-00000.bin",
        "val-00000.bin",
    ]
    train = index["splits"]["train"]
    assert (
        train["shards"][0]["tokens"] == train["tokens"] == (reference / "train-00000.bin").stat().st_size // 2
    )
    assert not partial_dir(reference).exists()


def test_two_runs_and_one_or_two_workers_are_byte_identical(
    reference: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    def snapshot(d: Path) -> dict[str, bytes]:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    out = tmp_path / "tokens"
    run(make_cfg(inputs, out, overwrite=True))
    first = snapshot(out)
    run(make_cfg(inputs, out, overwrite=True))
    assert snapshot(out) == first  # every byte, config and manifest included
    assert data_files(out) == data_files(reference)
    two = tmp_path / "two"
    run(make_cfg(inputs, two, workers=2))
    assert data_files(two) == data_files(reference)


def test_interrupted_run_resumes_and_matches(
    reference: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(inputs, out), stop_after_parts=3)
    assert not out.exists()
    markers = sorted((partial_dir(out) / "parts").glob("part-*.json"))
    assert [m.name for m in markers] == ["part-00000.json", "part-00001.json", "part-00002.json"]
    # A truncated part file is detected and that part redone.
    victim = partial_dir(out) / "parts" / "part-00001.train.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    stats = run(make_cfg(inputs, out))
    assert stats["run"]["parts_skipped"] == 2
    assert data_files(out) == data_files(reference)


def test_changed_settings_discard_leftover_parts(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(inputs, out, workers=2), stop_after_parts=2)
    stats = run(make_cfg(inputs, out, seed=1))
    assert stats["run"]["parts_skipped"] == 0
    # Another seed picks other validation documents (but the same total).
    expected_val = [d["id"] for d in shakespeare_docs() if doc_fraction(d["id"], 1) < VAL_FRACTION]
    assert stats["splits"]["val"]["documents"] == len(expected_val) == 3
    assert stats["splits"]["train"]["documents"] + stats["splits"]["val"]["documents"] == 124


def test_shard_rotation_splits_at_exact_token_counts(
    reference: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "small"
    run(make_cfg(inputs, out, shard_tokens=50_000))
    small, ref = ShardSet(out, "train"), ShardSet(reference, "train")
    assert [len(a) for a in small.arrays][:-1] == [50_000] * (len(small.arrays) - 1)
    assert len(small.arrays) == -(-ref.num_tokens // 50_000) == 7
    assert np.array_equal(np.concatenate(small.arrays), ref.arrays[0])


def test_tiny_corpus_gets_one_validation_document(tmp_path: Path) -> None:
    docs = [{"id": "a", "text": "Now is the winter"}, {"id": "b", "text": "of our discontent"}]
    curated = write_curated(tmp_path / "c", docs)
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=300)
    tok.save(tmp_path / "tok")
    from lmforge.data.manifest import write_manifest

    write_manifest(tmp_path / "tok", stage="tokenizer train")
    assert doc_fraction("a", 0) >= 0.01 and doc_fraction("b", 0) >= 0.01
    cfg = TokenizeConfig(input=curated, tokenizer=tmp_path / "tok", output=tmp_path / "t", val_fraction=0.01)
    run(cfg)
    val, train = ShardSet(tmp_path / "t", "val"), ShardSet(tmp_path / "t", "train")
    assert (train.num_documents, val.num_documents) == (1, 1)
    assert tok.decode(val.arrays[0][:-1].tolist()) == "of our discontent" and val.arrays[0][-1] == tok.eos_id


def test_vocab_above_65536_writes_uint32(tmp_path: Path) -> None:
    docs = [{"id": str(i), "text": f"w{i} " * 3} for i in range(40)]
    curated = write_curated(tmp_path / "c", docs)
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=300)
    # Added tokens push the vocabulary past what uint16 can hold; the last one is used by the text.
    tok.backend.add_tokens([f"<x{i}>" for i in range(65_600)])
    assert tok.vocab_size > 65_536
    tok.save(tmp_path / "tok")
    from lmforge.data.manifest import write_manifest

    write_manifest(tmp_path / "tok", stage="tokenizer train")
    big = {"id": "big", "text": "<x65599> is id 65,899"}
    curated = write_curated(tmp_path / "c2", [*docs, big])
    run(TokenizeConfig(input=curated, tokenizer=tmp_path / "tok", output=tmp_path / "t", val_fraction=0.0))
    s = ShardSet(tmp_path / "t", "train")
    assert s.dtype == np.uint32 and (tmp_path / "t" / "train-00000.bin").stat().st_size == 4 * s.num_tokens
    arr = s.arrays[0]
    assert int(arr.max()) == tok.backend.token_to_id("<x65599>") > 65_535
    assert tok.decode(split_docs(arr, tok.eos_id)[-1]) == big["text"]


def test_cli_and_user_errors(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens"
    args = ["tokenize", f"input={inputs[0]}", f"tokenizer={inputs[1]}", f"output={out}", "part_bytes=300000"]
    assert cli(args) == 0
    assert "tok/s" in capsys.readouterr().err and json.loads((out / "index.json").read_text())["version"] == 1
    assert cli(args) == 2
    assert "already exists; pass overwrite=true" in capsys.readouterr().err
    assert cli([*args, "overwrite=true", "workerz=2"]) == 2
    assert "did you mean 'workers'" in capsys.readouterr().err
    assert cli(["tokenize", f"input={inputs[0]}", f"tokenizer={tmp_path}", f"output={tmp_path / 'x'}"]) == 3
    assert "no manifest" in capsys.readouterr().err
    bad_tok = tmp_path / "tok"
    shutil.copytree(inputs[1], bad_tok)
    (bad_tok / "tokenizer.json").write_text("{}")
    assert cli(["tokenize", f"input={inputs[0]}", f"tokenizer={bad_tok}", f"output={tmp_path / 'y'}"]) == 3
    assert "tokenizer.json: " in capsys.readouterr().err


def test_hf_tokenizer_folder_without_manifest_with_verify_input_off(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """An HF folder has no manifest and may lack special_tokens_map.json: verify_input=false accepts it."""
    hf = tmp_path / "hf-tok"
    hf.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(inputs[1] / name, hf / name)
    out = tmp_path / "tokens"
    args = ["tokenize", f"input={inputs[0]}", f"tokenizer={hf}", f"output={out}", "part_bytes=300000"]
    assert cli(args) == 3  # verified by default: no manifest is an integrity error
    assert cli([*args, "verify_input=false"]) == 0
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not Path(f"{out}.partial").exists()


def test_special_token_strings_in_documents_stay_text(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    text = "The play ends here.<|endoftext|>Or does it? <|im_start|>user"
    docs = [{"id": "quote", "text": text}, {"id": "other", "text": "Exit, pursued by a bear."}]
    curated = write_curated(tmp_path / "c", docs)
    tok = load_tokenizer(inputs[1])
    for parse, inner_eos in ((False, 0), (True, 1)):
        out = tmp_path / f"t{parse}"
        run(
            TokenizeConfig(
                input=curated, tokenizer=inputs[1], output=out, val_fraction=0, parse_special_tokens=parse
            )
        )
        arr = ShardSet(out).arrays[0]
        first = split_docs(arr, tok.eos_id)[0] if not parse else arr[: len(tok.encode(text)) + 1].tolist()
        assert int((arr == tok.eos_id).sum()) == 2 + inner_eos
        assert tok.decode(first[:-1] if parse else first) == text
        assert (tok.special_tokens["<|im_start|>"] in arr.tolist()) == parse


def test_demo_configs_load_with_the_make_demo_overrides() -> None:
    from lmforge.config import load_config
    from lmforge.data.tokenizer_train import TokenizerTrainConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "demo"
    tc = load_config(
        TokenizerTrainConfig,
        root / "tokenizer.yaml",
        ["input=runs/demo/curated", "output=runs/demo/tokenizer"],
        command="tokenizer train",
    )
    assert tc.vocab_size == 4096 and tc.special_tokens.extra == ["<|im_start|>", "<|im_end|>"]
    kc = load_config(
        TokenizeConfig,
        root / "tokenize.yaml",
        ["input=runs/demo/curated", "tokenizer=runs/demo/tokenizer", "output=runs/demo/tokens"],
        command="tokenize",
    )
    # The tokenizer's held-out documents are tokenize's validation documents.
    assert (kc.val_fraction, kc.seed) == (tc.heldout_fraction, tc.seed) and kc.workers == 2
