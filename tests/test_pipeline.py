"""`lmforge run`: a tiny pipeline (prepare -> tokenizer -> tokenize -> pretrain 2 steps) run, rerun with
nothing changed, rerun after one config change, and after a stage failure. Each stage is a real
subprocess of the real command; the state file and the outputs' manifests say what ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.cli import main
from train_helpers import shakespeare_text

STAGES = ["prepare", "tokenizer", "tokenize", "pretrain"]


def pipeline(tmp: Path, *, val_fraction: float = 0.2, model: str = "tiny") -> Path:
    """The pipeline file: inline configs, paths relative to its folder (the default workdir)."""
    spec: dict[str, Any] = {
        "command": "run",
        "stages": [
            {
                "stage": "prepare",
                "config": {"input": "raw", "output": "curated", "quality": {"min_chars": 100}},
            },
            {"stage": "tokenizer", "config": "tokenizer.yaml", "overrides": {"output": "tokenizer"}},
            {
                "stage": "tokenize",
                "config": {"input": "curated", "tokenizer": "tokenizer", "output": "tokens"},
                "overrides": {"val_fraction": val_fraction},
            },
            {
                "stage": "pretrain",
                "config": {
                    "data": "tokens",
                    "output": "run",
                    "model": model,
                    "seq_len": 32,
                    "global_batch": 4,
                    "micro_batch": 4,
                    "max_steps": 2,
                    "eval": {"every": 0, "batches": 1, "batch_size": 2, "sample_tokens": 0},
                    "threads": 1,
                    "tensorboard": False,
                    "progress": False,
                },
            },
        ],
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    text = shakespeare_text(60_000)
    for i in range(6):
        (raw / f"part{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    # a stage config file beside the pipeline; its ./ path is relative to its own folder
    (tmp_path / "tokenizer.yaml").write_text("command: tokenizer train\ninput: ./curated\nvocab_size: 300\n")
    return tmp_path


def ran(err: str) -> list[str]:
    return [line.split("] ")[1].split(":")[0] for line in err.splitlines() if ": running `lmforge" in line]


def stamps(root: Path) -> dict[str, int]:
    return {
        d: (root / d / "manifest.json").stat().st_mtime_ns for d in ("curated", "tokenizer", "tokens", "run")
    }


def state(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / "pipeline.state.json").read_text())["stages"])


def test_reruns_only_what_changed(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = pipeline(project)
    assert main(["run", str(file)]) == 0
    assert ran(capsys.readouterr().err) == STAGES
    assert [s["status"] for s in state(project).values()] == ["done"] * 4
    assert state(project)["tokenize"]["inputs"].keys() == {"curated", "tokenizer"}
    before, state_bytes = stamps(project), (project / "pipeline.state.json").read_bytes()

    # nothing changed: nothing runs, no output or state byte is touched
    assert main(["run", str(file)]) == 0
    err = capsys.readouterr().err
    assert ran(err) == [] and err.count("up to date, skipped") == 4
    assert stamps(project) == before and (project / "pipeline.state.json").read_bytes() == state_bytes

    # one config changes: that stage and the ones after it, said first by --dry-run
    file = pipeline(project, val_fraction=0.25)
    assert main(["run", str(file), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "[3/4] tokenize: would run `lmforge tokenize`: its config changed" in err
    assert "[4/4] pretrain: would run `lmforge pretrain`: it comes after tokenize, which would run" in err
    assert stamps(project) == before
    assert main(["run", str(file)]) == 0
    assert ran(capsys.readouterr().err) == ["tokenize", "pretrain"]
    after = stamps(project)
    unchanged = [after[d] == before[d] for d in ("curated", "tokenizer", "tokens", "run")]
    assert unchanged == [True, True, False, False]

    # --from NAME runs that stage and the ones after it, whatever the state says
    assert main(["run", str(file), "--from", "pretrain"]) == 0
    assert ran(capsys.readouterr().err) == ["pretrain"]
    assert main(["run", str(file), "--from", "nope"]) == 2
    assert "--from: no stage 'nope'" in capsys.readouterr().err
    bad_name = file.read_text().replace("- stage: prepare", "- stage: prepare\n  name: a/b")
    (project / "bad.yaml").write_text(bad_name)
    assert main(["run", str(project / "bad.yaml")]) == 2
    assert "name: expected letters, digits" in capsys.readouterr().err


def test_a_failed_stage_stops_the_pipeline_and_a_rerun_continues_from_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a config error is found before anything runs: one line naming the stage, file and key
    bad = pipeline(project)
    (project / "tokenizer.yaml").write_text("command: tokenizer train\ninput: ./curated\nvocab_sise: 300\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages.1 (tokenizer)" in err and "unknown key 'vocab_sise'; did you mean 'vocab_size'?" in err
    assert ran(err) == [] and not (project / "pipeline.state.json").exists()
    (project / "tokenizer.yaml").write_text("command: tokenizer train\ninput: ./curated\nvocab_size: 300\n")

    # a stage that fails when it runs (an unknown model preset) stops the pipeline with its exit code
    assert main(["run", str(pipeline(project, model="nope"))]) == 2
    err = capsys.readouterr().err
    assert ran(err) == STAGES and "error: stage pretrain failed (exit 2)" in err
    assert state(project)["pretrain"]["status"] == "failed" and state(project)["pretrain"]["exit_code"] == 2
    assert not (project / "run").exists()
    before = stamps_partial(project)

    # fixed: the rerun starts at the failed stage; the earlier ones are not run again
    assert main(["run", str(pipeline(project))]) == 0
    assert ran(capsys.readouterr().err) == ["pretrain"]
    assert stamps_partial(project) == before and (project / "run" / "model" / "model.safetensors").is_file()
    assert [s["status"] for s in state(project).values()] == ["done"] * 4


def stamps_partial(root: Path) -> dict[str, int]:
    return {d: (root / d / "manifest.json").stat().st_mtime_ns for d in ("curated", "tokenizer", "tokens")}


def test_the_demo_pipeline_runs_the_documented_commands() -> None:
    """Each stage of configs/demo/pipeline.yaml is its config file with the overrides its first line
    documents (what `make demo` ran before), so the pipeline makes the same runs/demo/."""
    from lmforge.config import load_config
    from lmforge.pipeline.spec import load_pipeline, schema_of
    from test_config import documented_overrides

    root = Path(__file__).resolve().parents[1]
    pipe = load_pipeline(root / "configs" / "demo" / "pipeline.yaml")
    assert pipe.workdir == root and pipe.state == root / "runs" / "demo" / "pipeline.state.json"
    assert [s.name for s in pipe.stages] == STAGES
    for stage, name in zip(pipe.stages, ["prepare", "tokenizer", "tokenize", "pretrain"], strict=True):
        path = root / "configs" / "demo" / f"{name}.yaml"
        # the documented command runs from the repo root; its overrides are relative to it
        overrides = [f"{k}={root / v}" for k, v in (o.split("=", 1) for o in documented_overrides(path))]
        documented = load_config(schema_of(stage.command, name), path, overrides)
        assert stage.config_dict() == {
            k: v
            for k, v in documented.model_dump(mode="json").items()
            if k not in ("overwrite", "resume", "progress")
        }
        assert stage.tree["overwrite"] is True


def test_dot_slash_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    from lmforge.config import load_config
    from lmforge.train.dpo import DPOConfig

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "dpo.yaml").write_text("model: runs/x\ndata: ./prefs.jsonl\noutput: ../out\n")
    cfg = load_config(DPOConfig, folder / "dpo.yaml", ["eval_data=./held.jsonl"])
    assert cfg.data == str(folder / "prefs.jsonl") and cfg.output == str(tmp_path / "out")
    assert cfg.model == "runs/x" and cfg.eval_data == "./held.jsonl"  # cwd-relative: unchanged
