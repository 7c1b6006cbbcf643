"""Progress outside a terminal: every long command logs `done/total`, rate and ETA lines (lmforge.progress).

The commands run through the CLI with stderr captured (not a terminal) and LMFORGE_PROGRESS_INTERVAL=0, so
every update is a line; the lines must parse, count up monotonically and end at the total.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from export_helpers import llama_cfg, make_model_dir
from lmforge.errors import ConfigError
from lmforge.progress import INTERVAL_ENV, Progress, clock, interval
from tokenizer_corpus import shakespeare_docs

LINE = re.compile(
    r"^(?P<label>[^:]+): (?P<done>\d+)(?:/(?P<total>\d+))?(?: (?P<unit>[a-z]+))?(?: \(\d+%\))?"
    r"  rate (?P<rate>[0-9.,e+]+)(?: [a-z]+)?/s  eta (?P<eta>\?|\d+:\d\d:\d\d)  elapsed \d+:\d\d:\d\d"
)


def progress_lines(stderr: str, label: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := LINE.match(line)) and m["label"] == label]


def assert_counts_up_to_total(lines: list[re.Match[str]], total: int | None = None) -> None:
    assert lines, "no progress lines"
    done = [int(m["done"]) for m in lines]
    assert done == sorted(done) and done[0] > 0
    totals = {m["total"] for m in lines}
    assert len(totals) == 1 and None not in totals, totals
    want = int(lines[-1]["total"])
    assert done[-1] == want and (total is None or want == total)
    assert lines[-1]["eta"] == "0:00:00"
    assert all(float(m["rate"].replace(",", "")) > 0 for m in lines)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """Run `lmforge ARGS` in tmp_path with stderr captured (not a terminal); returns its stderr."""
    from lmforge.cli import main

    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> str:
        capsys.readouterr()
        rc = main(list(args))
        err = capsys.readouterr().err
        assert rc == 0, err[-3000:]
        return err

    return run


# -- the helper ----------------------------------------------------------------------------------------
def test_log_lines_have_count_rate_eta_and_end_at_the_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    out = io.StringIO()
    with Progress("work", 4, "items", stream=out) as bar:
        for _ in range(4):
            bar.advance(note="x")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per update at interval 0, no duplicate closing line
    assert [int(m["done"]) for m in map(LINE.match, lines) if m] == [1, 2, 3, 4]
    assert lines[1].startswith("work: 2/4 items (50%)  rate ") and lines[1].endswith("  x")
    assert_counts_up_to_total(progress_lines(out.getvalue(), "work"), 4)


def test_quiet_when_short_disabled_or_unknown_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    out = io.StringIO()
    with Progress("short", 3, stream=out) as bar:  # finished before the first interval: no line at all
        bar.advance(3)
    assert out.getvalue() == ""
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with Progress("off", 3, stream=out, enabled=False) as bar:
        bar.advance(3)
    assert out.getvalue() == ""
    with Progress("open", None, "docs", stream=out) as bar:
        bar.advance(7)
    assert re.match(r"open: 7 docs  rate [0-9.,e+]+ docs/s  eta \?  elapsed 0:00:00$", out.getvalue())


def test_interval_env_and_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval() == 10.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=f"{INTERVAL_ENV}='{bad}': expected a number of seconds >= 0"):
            interval()
    assert (clock(3725.4), clock(0), clock(None)) == ("1:02:05", "0:00:00", "?")


# -- the commands --------------------------------------------------------------------------------------
def test_export_hf_logs_parity_progress(tmp_path: Path, cli: Any) -> None:
    pytest.importorskip("transformers")
    src = make_model_dir(tmp_path / "model", llama_cfg())
    err = cli("export", "hf", str(src), f"output={tmp_path / 'hf'}", "new_tokens=3", "seq_len=500")
    assert f"export hf: writing {tmp_path / 'hf'}" in err
    assert "notice: seq_len=500 exceeds the model's context (128); using seq_len=128" in err
    lines = progress_lines(err, "export hf parity")
    # 3 prompts x (2 x 3 greedy tokens + 2 scorings) + 2 x the sonnet's 128-token windows
    windows = json.loads((tmp_path / "hf" / "parity.json").read_text())["parity"]["perplexity_tokens"]
    assert_counts_up_to_total(lines, 3 * 8 + 2 * -(-windows // 128))
    assert all(m["unit"] == "passes" for m in lines)


def test_prepare_and_tokenize_log_progress(tmp_path: Path, cli: Any) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = shakespeare_docs(files=1)[:40]
    for i, d in enumerate(docs):
        (raw / f"doc{i:03d}.txt").write_text(d["text"], encoding="utf-8")
    lines = progress_lines(
        cli("prepare", f"input={raw}", "output=curated"), "prepare"
    )  # text bytes read, against the files' size
    done = [int(m["done"]) for m in lines]
    assert lines and done == sorted(done) and 0 < done[-1] <= int(lines[-1]["total"])
    assert {m["total"] for m in lines} == {str(sum(f.stat().st_size for f in raw.iterdir()))}
    kept = json.loads((tmp_path / "curated" / "report.json").read_text())["documents"]["out"]
    cli("tokenizer", "train", "input=curated", "output=tok", "vocab_size=300")
    lines = progress_lines(
        cli("tokenize", "input=curated", "tokenizer=tok", "output=tokens", "part_bytes=2000"), "tokenize"
    )
    assert_counts_up_to_total(lines, kept)
    assert len(lines) > 3 and all(m["unit"] == "docs" for m in lines)
    # the same tokens: quantize (layers, perplexity before/after) and eval (scored tokens)
    from lmforge.tokenizer import load_tokenizer

    make_model_dir(tmp_path / "model", llama_cfg(vocab_size=300), load_tokenizer(tmp_path / "tok"))
    err = cli(
        "quantize",
        "model=model",
        "output=int8",
        "method=int8",
        "data=tokens",
        "report.max_tokens=3000",
        "report.decode_tokens=2",
        "report.repeats=1",
    )
    assert_counts_up_to_total(progress_lines(err, "quantize int8"), 2 * 7)  # 2 blocks x q, k, v, o, 3 MLP
    before, after = (
        progress_lines(err, "quantize perplexity before"),
        progress_lines(err, "quantize perplexity after"),
    )
    assert_counts_up_to_total(before) and assert_counts_up_to_total(after)
    assert before[-1]["total"] == after[-1]["total"]
    err = cli(
        "eval",
        "model=model",
        "output=eval",
        "tasks=[{type: perplexity, data: tokens, seq_len: 999, max_tokens: 3000}]",
    )
    assert (
        "notice: tasks[tokens].seq_len=999 exceeds the model's context (128); using tasks[tokens].seq_len=128"
        in err
    )
    scored = json.loads((tmp_path / "eval" / "report.json").read_text())["tasks"][0]["metrics"]["tokens"]
    assert_counts_up_to_total(progress_lines(err, "eval tokens"), scored)
