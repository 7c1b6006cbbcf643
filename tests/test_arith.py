"""The RL demo's addition task: correct answers, a held-out split disjoint from training, determinism by
seed, the one-token-per-character tokenizer, and the before/after accuracy report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main as cli
from lmforge.data.arith import accuracy, byte_tokenizer, compare, make_task
from lmforge.errors import ConfigError, DataError


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_are_sums_and_heldout_is_disjoint(tmp_path: Path) -> None:
    assert (
        cli(
            [
                "data",
                "arith",
                f"output={tmp_path / 'd'}",
                "digits=3",
                "n_train=500",
                "n_heldout=100",
                "n_sft=500",
            ]
        )
        == 0
    )
    train, held = _rows(tmp_path / "d/prompts.jsonl"), _rows(tmp_path / "d/heldout.jsonl")
    sft = _rows(tmp_path / "d/sft.jsonl")
    assert (len(train), len(held), len(sft)) == (500, 100, 500)
    for r in train + held:
        a, b = r["prompt"].removesuffix("=").split("+")
        assert r["prompt"].endswith("=") and int(r["answer"]) == int(a) + int(b)
        assert 0 <= int(a) <= 999 and 0 <= int(b) <= 999
    assert len({r["prompt"] for r in train}) == 500  # unique pairs
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert [{"prompt": r["prompt"], "completion": r["answer"]} for r in train] == sft
    assert (tmp_path / "d/manifest.json").is_file() and (tmp_path / "d/tokenizer/manifest.json").is_file()


def test_same_seed_same_bytes_other_seed_other_problems(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert (
            cli(["data", "arith", f"output={tmp_path / name}", f"seed={seed}", "n_train=50", "n_sft=20"]) == 0
        )
    for f in ("prompts.jsonl", "heldout.jsonl", "sft.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a/prompts.jsonl").read_bytes() != (tmp_path / "c/prompts.jsonl").read_bytes()
    assert len(_rows(tmp_path / "a/sft.jsonl")) == 20


def test_operand_digits_and_bad_sizes() -> None:
    task = make_task(seed=3, digits=2, min_digits=2, n_train=300, n_heldout=50, n_sft=10)
    assert all(10 <= x <= 99 for pair in task.train + task.heldout for x in pair)
    with pytest.raises(ConfigError, match="only 8100 distinct pairs"):
        make_task(seed=0, digits=2, min_digits=2, n_train=8000, n_heldout=101, n_sft=0)
    with pytest.raises(ConfigError, match="n_sft: expected at most n_train"):
        make_task(seed=0, digits=2, n_train=10, n_heldout=1, n_sft=11)


def test_cli_bad_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(["data", "arith", f"output={tmp_path / 'd'}", "digits=1", "n_train=99", "n_heldout=2", "n_sft=0"])
        == 2
    )
    assert "n_train + n_heldout: 101 problems asked" in capsys.readouterr().err


def test_byte_tokenizer_one_token_per_character() -> None:
    tok = byte_tokenizer()
    assert tok.vocab_size == 261
    ids = tok.encode("123+4567=5690")
    assert len(ids) == 13 and tok.decode(ids) == "123+4567=5690"
    assert tok.encode("12+3=") + tok.encode("15") == tok.encode("12+3=15")  # prompt/answer split is exact


def test_accuracy_scorer() -> None:
    assert accuracy(["46", " 47\n", "100", "1000"], ["46", "47", "10", "1000"]) == 0.75
    assert accuracy([], []) == 0.0
    with pytest.raises(DataError, match="2 outputs for 1 answers"):
        accuracy(["1", "2"], ["1"])


def _eval_report(model: str, em: float, n: int = 200) -> dict[str, object]:
    return {
        "model": model,
        "tasks": [{"name": "heldout", "type": "generation", "metrics": {"exact_match": em, "n": n}}],
    }


def test_compare_reports_gain_in_points() -> None:
    r = compare(_eval_report("sft", 0.215), _eval_report("grpo", 0.6), "heldout", ("a", "b"))
    assert r["gain_points"] == 38.5 and r["n"] == 200
    assert r["before"] == {"model": "sft", "accuracy": 0.215} and r["after"]["accuracy"] == 0.6
    with pytest.raises(DataError, match="no task named 'other'"):
        compare(_eval_report("a", 0.1), _eval_report("b", 0.2), "other", ("a", "b"))
    with pytest.raises(DataError, match="b: 100 held-out examples, but a has 200"):
        compare(_eval_report("a", 0.1), _eval_report("b", 0.2, n=100), "heldout", ("a", "b"))


def test_report_command_reads_eval_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.data.manifest import write_manifest
    from lmforge.io import atomic_write_json

    for name, em in (("before", 0.25), ("after", 0.7)):
        (tmp_path / name).mkdir()
        atomic_write_json(tmp_path / name / "report.json", _eval_report(name, em))
        write_manifest(tmp_path / name, stage="eval")
    argv = [f"before={tmp_path / 'before'}", f"after={tmp_path / 'after'}", f"output={tmp_path / 'acc'}"]
    assert cli(["data", "arith-report", *argv]) == 0
    assert "before 25.0%  after 70.0%  gain +45.0 points" in capsys.readouterr().out
    out = json.loads((tmp_path / "acc/accuracy.json").read_text())
    assert out["gain_points"] == 45.0 and len(out["load_average"]) == 3
    (tmp_path / "after/report.json").write_text("{}\n")  # changed after its manifest was written
    assert cli(["data", "arith-report", *argv, "overwrite=true"]) == 3
