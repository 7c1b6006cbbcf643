"""Hugging Face datasets as input: folders written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
Arrow files, and `hf:ORG/NAME[:config][@revision]` ids resolved from a real hub cache layout with
HF_HUB_OFFLINE=1, all built by `datasets` itself in the test and read without network. The same rows
given as JSONL give identical `prepare` output, identical SFT examples and DPO pairs, and identical eval
metrics; bad settings give one-line errors naming what is available."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from huggingface_hub import constants  # noqa: E402

from hub_helpers import add_snapshot, commit_hash  # noqa: E402
from lmforge.cli import main as cli  # noqa: E402
from lmforge.data.chat import SFTDataConfig, load_sft  # noqa: E402
from lmforge.data.curated import iter_curated  # noqa: E402
from lmforge.data.hfdata import HFDataConfig, is_hf_source, iter_records, parse_hub_id  # noqa: E402
from lmforge.data.preference import load_pairs, train_and_held_pairs  # noqa: E402
from lmforge.data.prepare import PrepareConfig, run  # noqa: E402
from lmforge.errors import ConfigError, DataError  # noqa: E402
from lmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from train_helpers import shakespeare_text  # noqa: E402

COMMIT = commit_hash("tiny-v1")
README = """---
configs:
- config_name: default
  default: true
  data_files:
  - {split: train, path: data/train-*.parquet}
  - {split: test, path: data/test-*.parquet}
- config_name: small
  data_files:
  - {split: train, path: small/train-*.parquet}
---
"""


def _paragraphs() -> list[str]:
    paras = [p.strip() for p in shakespeare_text(60_000).split("\n\n") if len(p.strip()) > 40][:60]
    return paras + paras[:5]  # exact duplicates, which prepare must drop the same way


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF_HOME whose hub cache holds datasets--org--tiny (parquet train/test at COMMIT)."""
    home = tmp_path / "hf_home"
    src = tmp_path / "hub_src" / "data"
    src.mkdir(parents=True)
    rows = [{"body": t, "n": i} for i, t in enumerate(_paragraphs())]
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), src / "test-00000-of-00001.parquet")
    (src.parent / "small").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), src.parent / "small" / "train-00000-of-00001.parquet")
    (src.parent / "README.md").write_text(README)
    add_snapshot(home / "hub", "org/tiny", src.parent, COMMIT, kind="datasets")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import, so patched too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home


def _curated(cfg: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    base: dict[str, Any] = {"quality": {"min_chars": 20, "min_words": 3}, "report": {"sample_size": 0}}
    report = run(PrepareConfig.model_validate({**base, **cfg}), quiet=True)
    texts = [d["text"] for d in iter_curated(Path(cfg["output"]))]
    keep = ("docs_in", "docs_out", "kept", "dropped", "bytes_out")
    return texts, {k: report[k] for k in keep if k in report}


def test_prepare_reads_every_hf_source_like_jsonl(tmp_path: Path, hub: Path) -> None:
    paras = _paragraphs()
    ref_texts, ref_counts = _curated(
        {
            "input": str(_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in paras])),
            "output": str(tmp_path / "j"),
        }
    )
    assert 0 < len(ref_texts) < len(paras)  # the duplicates were dropped
    ds = datasets.Dataset.from_dict({"text": paras, "n": list(range(len(paras)))})
    ds.save_to_disk(tmp_path / "ds")
    other = datasets.Dataset.from_dict({"text": ["held out " * 5]})
    datasets.DatasetDict({"train": ds, "validation": other}).save_to_disk(tmp_path / "dd")
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    sources: list[dict[str, Any]] = [
        {"input": str(tmp_path / "ds")},
        {"input": str(tmp_path / "dd")},
        {"input": str(arrow)},
        {"input": "hf:org/tiny", "ingest": {"text_field": "body"}},
        {
            "input": f"hf:org/tiny@{COMMIT}",
            "ingest": {"hf": {"columns": {"text": "body"}, "streaming": True}},
        },
    ]
    for i, extra in enumerate(sources):
        texts, counts = _curated({**extra, "output": str(tmp_path / f"o{i}")})
        assert texts == ref_texts, extra
        assert counts == ref_counts, extra
    docs = list(iter_curated(tmp_path / "o1"))
    assert docs[0]["source"] == str(tmp_path / "dd") and docs[0]["id"] == f"{tmp_path / 'dd'}[train]:1"


def test_sft_and_dpo_rows_are_identical_to_jsonl(tmp_path: Path) -> None:
    tok: Tokenizer = train_tokenizer([p for p in _paragraphs() if p], vocab_size=400)
    words = shakespeare_text(20_000).split()
    chats = [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[i : i + 6])},
                {"role": "assistant", "content": " ".join(words[i + 6 : i + 14])},
            ]
        }
        for i in range(0, 400, 20)
    ]
    jl = _jsonl(tmp_path / "chat.jsonl", chats)
    datasets.Dataset.from_list(chats).save_to_disk(tmp_path / "chat")
    ref = load_sft(SFTDataConfig(train=[str(jl)]), tok, seq_len=64)
    got = load_sft(SFTDataConfig(train=[str(tmp_path / "chat")]), tok, seq_len=64)
    assert [(e.ids, e.mask) for e in got.train] == [(e.ids, e.mask) for e in ref.train]
    assert got.stats == ref.stats and ref.stats["train_examples"] == len(chats)
    # prompt/completion under other column names, mapped with hf.columns
    qa = [{"question": c["messages"][0]["content"], "answer": c["messages"][1]["content"]} for c in chats]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa)}).save_to_disk(tmp_path / "qa")
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in qa])
    cols = {"prompt": "question", "completion": "answer"}
    mapped = load_sft(SFTDataConfig(train=[str(tmp_path / "qa")], hf={"columns": cols}), tok, seq_len=64)
    plain = load_sft(SFTDataConfig(train=[str(pc)]), tok, seq_len=64)
    assert [e.ids for e in mapped.train] == [e.ids for e in plain.train] == [e.ids for e in ref.train]

    prefs = [{"prompt": r["question"], "chosen": r["answer"], "rejected": r["answer"][::-1]} for r in qa]
    datasets.Dataset.from_list(prefs).save_to_disk(tmp_path / "pref")
    a, sa = load_pairs(_jsonl(tmp_path / "pref.jsonl", prefs), tok, max_len=48, max_prompt_len=16)
    b, sb = load_pairs(tmp_path / "pref", tok, max_len=48, max_prompt_len=16)
    assert sa == sb and sa.pairs == len(prefs)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.chosen, y.chosen) and np.array_equal(x.rejected, y.rejected)
        assert (x.prompt_len, x.line) == (y.prompt_len, y.line)


def test_hub_ids_splits_and_revisions_offline(hub: Path) -> None:
    rows = [r for _, _, r in iter_records("hf:org/tiny", HFDataConfig())]
    assert len(rows) == len(_paragraphs()) and rows[0]["n"] == 0
    test = [(n, w, r["n"]) for n, w, r in iter_records("hf:org/tiny#test", HFDataConfig())]
    assert test == [
        (1, "hf:org/tiny[test]:1", 0),
        (2, "hf:org/tiny[test]:2", 1),
        (3, "hf:org/tiny[test]:3", 2),
    ]
    streamed = [r for _, _, r in iter_records(f"hf:org/tiny@{COMMIT}", HFDataConfig(streaming=True))]
    assert streamed == rows
    small = [r["n"] for _, _, r in iter_records(f"hf:org/tiny:small@{COMMIT}", HFDataConfig())]
    assert small == [0, 1]
    assert parse_hub_id("hf:a/b:cfg@v1#test") == parse_hub_id("hf:a/b:cfg@v1")
    assert (parse_hub_id("hf:a/b:cfg@v1").config, parse_hub_id("hf:a/b:cfg@v1").revision) == ("cfg", "v1")
    assert is_hf_source("hf:a/b") and not is_hf_source("a/b.jsonl")


def test_errors_are_one_line_and_name_what_exists(tmp_path: Path, hub: Path) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["x"]})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"no split 'test'; available: train \(set hf.split\)"):
        list(iter_records(str(tmp_path / "dd"), HFDataConfig(split="test")))
    with pytest.raises(DataError, match=r"hf.columns.prompt: no column 'question' in .*; available: q$"):
        list(iter_records(str(tmp_path / "dd"), HFDataConfig(columns={"prompt": "question"})))
    with pytest.raises(DataError, match=r"Unknown split \"valid\""):
        list(iter_records("hf:org/tiny", HFDataConfig(split="valid")))
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set.*hf download org/none"):
        list(iter_records("hf:org/none", HFDataConfig()))
    with pytest.raises(ConfigError, match="expected hf:ORG/NAME"):
        parse_hub_id("hf:noslash")


def test_prepare_command_exits_2_naming_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["x"]})}).save_to_disk(tmp_path / "dd")
    assert cli(["prepare", f"input={tmp_path / 'dd'}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("ingest.text_field: no column 'text' in " + f"{tmp_path / 'dd'}; available: q")


def test_eval_tasks_read_datasets(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("sacrebleu")
    from infer_helpers import make_tokenizer, save_hf_model

    save_hf_model("llama", make_tokenizer(), tmp_path / "m", seed=1)
    words = shakespeare_text(20_000).split()
    mc = [
        {"query": " ".join(words[i : i + 6]), "choices": words[i + 6 : i + 9], "gold": i % 3}
        for i in range(8)
    ]
    gen = [{"prompt": " ".join(words[i : i + 5]), "reference": words[i + 5]} for i in range(0, 40, 5)]
    renamed = [{"question": r["query"], "options": r["choices"], "label": r["gold"]} for r in mc]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(renamed)}).save_to_disk(tmp_path / "mc")
    datasets.Dataset.from_list(gen).save_to_disk(tmp_path / "gen")
    task = {"choices_field": "options", "gold_field": "label", "context_field": "question"}
    tasks = [
        {"type": "multiple_choice", "name": "j", "data": str(_jsonl(tmp_path / "mc.jsonl", mc))},
        {
            "type": "multiple_choice",
            "name": "h",
            "data": str(tmp_path / "mc"),
            "hf": {"split": "test"},
            **task,
        },
        {"type": "generation", "name": "gj", "data": str(_jsonl(tmp_path / "g.jsonl", gen)), "max_tokens": 3},
        {"type": "generation", "name": "gh", "data": str(tmp_path / "gen"), "max_tokens": 3},
    ]
    cfg = {"model": str(tmp_path / "m"), "output": str(tmp_path / "r"), "tasks": tasks}
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))
    assert cli(["eval", "-c", str(tmp_path / "eval.yaml")]) == 0
    res = {t["name"]: t["metrics"] for t in json.loads((tmp_path / "r" / "report.json").read_text())["tasks"]}
    for a, b, keys in (("j", "h", ("acc", "acc_norm", "n")), ("gj", "gh", ("bleu", "exact_match", "n"))):
        assert [res[a][k] for k in keys] == [res[b][k] for k in keys]
    assert res["h"]["n"] == 8 and res["gh"]["n"] == 8


def test_grpo_prompts_and_reward_pairs_read_datasets(tmp_path: Path) -> None:
    """align grpo's prompts and align reward's pairs (its `hf` key passed through) read datasets like JSONL."""
    from lmforge.train.align_configs import RewardConfig
    from lmforge.train.grpo_data import load_prompts

    tok: Tokenizer = train_tokenizer([p for p in _paragraphs() if p], vocab_size=400)
    words = shakespeare_text(20_000).split()
    rows = [{"q": " ".join(words[i : i + 6]), "answer": str(i)} for i in range(0, 300, 10)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "prompts")
    jl = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["q"], "answer": r["answer"]} for r in rows])
    ref, _ = load_prompts(jl, tok, max_prompt_len=8)
    got, cut = load_prompts(
        tmp_path / "prompts", tok, max_prompt_len=8, hf=HFDataConfig(columns={"prompt": "q"})
    )
    assert [(p.ids, p.text, p.row["answer"]) for p in got] == [(p.ids, p.text, p.row["answer"]) for p in ref]
    assert len(got) == 30 and cut > 0

    prefs = [{"question": r["q"], "good": r["answer"], "bad": r["answer"][::-1] + "x"} for r in rows]
    datasets.Dataset.from_list(prefs).save_to_disk(tmp_path / "pref")
    plain = [{"prompt": p["question"], "chosen": p["good"], "rejected": p["bad"]} for p in prefs]
    common = {
        "model": "tiny",
        "output": str(tmp_path / "rm"),
        "eval_fraction": 0.2,
        "max_len": 48,
        "max_prompt_len": 16,
    }
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    a = train_and_held_pairs(RewardConfig(data=str(_jsonl(tmp_path / "p.jsonl", plain)), **common), tok)
    b = train_and_held_pairs(RewardConfig(data=str(tmp_path / "pref"), hf={"columns": cols}, **common), tok)
    assert a[2] == b[2] and len(a[0]) == len(b[0]) == 24 and len(a[1]) == len(b[1]) == 6
    for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True):
        assert np.array_equal(x.chosen, y.chosen) and np.array_equal(x.rejected, y.rejected)
