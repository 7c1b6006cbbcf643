"""The RL demo's pipeline (configs/demo-rl/pipeline.yaml) end to end at test size: every stage runs with its
shipped config, shrunk by overrides (1-digit sums, a 1-layer model, 2 SFT and 2 GRPO steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "demo-rl"
TINY = {"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, "max_seq_len": 64}
SHRINK = {
    "data": {"digits": 1, "n_train": 64, "n_heldout": 16, "n_sft": 64},
    "sft": {"max_steps": 2, "model_overrides": TINY, "eval.every": 0, "global_batch": 4, "micro_batch": 4},
    "grpo": {
        "max_steps": 2,
        "global_batch": 16,
        "micro_batch": 16,
        "gen_batch": 16,
        "eval.max_prompts": 8,
        "log_every": 1,
    },
}


def test_the_stages_are_the_shipped_configs() -> None:
    spec = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    names = [s["name"] for s in spec["stages"]]
    assert names == ["data", "sft", "eval-sft", "grpo", "eval-grpo", "report"]
    grpo = yaml.safe_load((CONFIGS / "grpo.yaml").read_text())
    assert grpo["rewards"] == [{"kind": "exact_match", "field": "answer"}]
    assert (
        grpo["model"] == "../../runs/demo-rl/sft" and grpo["data"] == "../../runs/demo-rl/data/prompts.jsonl"
    )


@pytest.mark.slow
def test_shrunken_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the shipped files in a copy of the repo layout: their ../../runs paths land in tmp_path/runs
    copy = tmp_path / "configs" / "demo-rl"
    shutil.copytree(CONFIGS, copy)
    spec = yaml.safe_load((copy / "pipeline.yaml").read_text())
    for stage in spec["stages"]:
        stage["overrides"] = {**stage.get("overrides", {}), **SHRINK.get(stage["name"], {})}
    pipe = copy / "pipeline.yaml"
    pipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(pipe)]) == 0
    runs = tmp_path / "runs" / "demo-rl"
    acc = json.loads((runs / "accuracy" / "accuracy.json").read_text())
    ems = []
    for name in ("eval-sft", "eval-grpo"):
        report = json.loads((runs / name / "report.json").read_text())
        ems.append(report["tasks"][0]["metrics"]["exact_match"])
        assert report["tasks"][0]["metrics"]["n"] == 16
    assert (acc["before"]["accuracy"], acc["after"]["accuracy"]) == tuple(ems)
    assert acc["n"] == 16 and acc["gain_points"] == round(100 * (ems[1] - ems[0]), 2)
    steps = [json.loads(x) for x in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2]
    assert "held-out accuracy (16 problems, greedy): before" in capsys.readouterr().out
