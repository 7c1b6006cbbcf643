"""Relative paths in a config file resolve against the file's folder (the schema's `ConfigPath` /
`ConfigRef` fields); command-line overrides stay relative to the current directory; preset names, hub
ids, `scheme:` values and URLs are never touched. Also through the pipeline file and the sweep file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.config import ConfigPath, Section, field_table, load_config, resolve_paths
from lmforge.data.prepare import PrepareConfig
from lmforge.eval.run import EvalConfig
from lmforge.pipeline.spec import load_pipeline
from lmforge.sweep.config import SweepConfig, read_base, trial_config
from lmforge.train.configs import FinetuneConfig, PretrainConfig
from train_helpers import make_tokens_dir, shakespeare_text

TINY = {
    "model": "tiny",
    "model_overrides": {"dim": 32, "n_layers": 1},
    "seq_len": 32,
    "global_batch": 2,
    "micro_batch": 2,
    "max_steps": 2,
    "eval": {"every": 0, "batches": 1, "batch_size": 2, "sample_tokens": 0},
    "checkpoint": {"every": 0},
    "threads": 1,
    "tensorboard": False,
    "progress": False,
}


def write(path: Path, tree: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_a_config_in_another_folder_trains_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data: tokens` and `output: ../runs/r` in exp/pretrain.yaml are exp/tokens and runs/r, run from
    elsewhere/; the same config run with an override writes where the override says, relative to cwd."""
    make_tokens_dir(tmp_path / "exp" / "tokens", shakespeare_text(20_000), vocab_size=300)
    cfg = write(
        tmp_path / "exp" / "pretrain.yaml",
        {"command": "pretrain", "data": "tokens", "output": "../runs/r", **TINY},
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["pretrain", "-c", "../exp/pretrain.yaml"]) == 0
    assert (tmp_path / "runs" / "r" / "model" / "model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "exp" / "tokens") and saved["output"] == str(
        tmp_path / "runs" / "r"
    )
    assert saved["model"] == "tiny"  # a preset name, not a path next to the file

    assert main(["pretrain", "-c", str(cfg), "output=here"]) == 0  # an override: relative to the cwd
    assert (tmp_path / "elsewhere" / "here" / "model" / "model.safetensors").is_file()
    a = (tmp_path / "runs" / "r" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "elsewhere" / "here" / "model" / "model.safetensors").read_bytes() == a


def test_overrides_stay_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "exp" / "p.yaml", {"data": "tokens", "output": "out", "resume": "ckpt/step-1"})
    monkeypatch.chdir(tmp_path)
    c = load_config(PretrainConfig, cfg, ["data=other/tokens", "resume=auto"])
    assert c.data == "other/tokens" and c.resume == "auto"  # as given on the command line
    assert c.output == str(tmp_path / "exp" / "out")


def test_hub_ids_presets_schemes_urls_and_absolute_paths_are_untouched(tmp_path: Path) -> None:
    (tmp_path / "exp" / "local-model").mkdir(parents=True)
    tree = {
        "base": "HuggingFaceTB/SmolLM2-135M@main",  # a hub id (ConfigRef): nothing of that name here
        "tokenizer": "local-model",  # ConfigRef naming a folder that exists next to the file: resolved
        "output": "/abs/out",
        "data": {"train": ["a.jsonl", "hf:org/set", "https://example.com/x.jsonl", "~/d.jsonl"]},
    }
    c = load_config(FinetuneConfig, write(tmp_path / "exp" / "f.yaml", tree))
    assert c.base == "HuggingFaceTB/SmolLM2-135M@main"
    assert c.tokenizer == str(tmp_path / "exp" / "local-model")
    assert c.output == "/abs/out"
    assert c.data.train == [
        str(tmp_path / "exp" / "a.jsonl"),
        "hf:org/set",
        "https://example.com/x.jsonl",
        "~/d.jsonl",
    ]
    p = load_config(
        PrepareConfig,
        write(tmp_path / "exp" / "p.yaml", {"input": ["demo:shakespeare", "raw/*.txt"], "output": "cur"}),
    )
    assert p.input == ["demo:shakespeare", str(tmp_path / "exp" / "raw" / "*.txt")]
    pre = load_config(
        PretrainConfig, write(tmp_path / "exp" / "m.yaml", {"data": "t", "output": "o", "model": "./m.yaml"})
    )
    assert pre.model == str(tmp_path / "exp" / "m.yaml")  # ./ always marks a path


def test_path_fields_inside_lists_of_sections_resolve(tmp_path: Path) -> None:
    tasks = [{"type": "perplexity", "data": "val.txt"}, {"type": "generation", "data": "gen.jsonl"}]
    c = load_config(
        EvalConfig, write(tmp_path / "e" / "eval.yaml", {"model": "m", "output": "o", "tasks": tasks})
    )
    assert [t.data for t in c.tasks] == [str(tmp_path / "e" / "val.txt"), str(tmp_path / "e" / "gen.jsonl")]


def test_one_annotation_makes_a_field_file_relative_and_help_still_says_str(tmp_path: Path) -> None:
    class New(Section):
        report: ConfigPath | None = None
        note: str = "plain"

    tree = resolve_paths(New, {"report": "r.md", "note": "x/y"}, tmp_path)
    assert tree == {"report": str(tmp_path / "r.md"), "note": "x/y"}  # only the marked field
    assert [(k, t) for k, t, _, _ in field_table(New)] == [("report", "str | None"), ("note", "str")]


def test_pipeline_paths_resolve_against_the_file_that_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "p" / "cfgs" / "tok.yaml", {"command": "tokenizer train", "input": "../../curated"})
    spec = {
        "command": "run",
        "state": "state/pipe.json",
        "stages": [
            {"stage": "tokenizer", "config": "cfgs/tok.yaml", "overrides": {"output": "tok"}},
            {"stage": "tokenize", "config": {"input": "cur", "tokenizer": "tok", "output": "tokens"}},
            {"stage": "pretrain", "config": {"data": "tokens", "output": "run", "model": "tiny"}},
        ],
    }
    file = write(tmp_path / "p" / "pipeline.yaml", spec)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    pipe = load_pipeline(file, ["pretrain.output=mine"])
    p = tmp_path / "p"
    tok, tokenize, pre = (s.config for s in pipe.stages)
    assert str(tok.input) == str(tmp_path / "curated") and str(tok.output) == str(p / "tok")
    assert str(tokenize.input) == str(p / "cur") and str(tokenize.output) == str(p / "tokens")
    assert pre.data == str(p / "tokens") and pre.model == "tiny"
    assert pre.output == str(tmp_path / "cwd" / "mine")  # a command-line override: the cwd
    assert pipe.state == p / "state" / "pipe.json" and pipe.workdir == p


def test_sweep_base_and_fixed_paths_resolve_against_their_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "base" / "pretrain.yaml",
        {"command": "pretrain", "data": "tokens", "output": "unused", **TINY},
    )
    spec = {
        "output": "out",
        "train": {
            "command": "pretrain",
            "config": "../base/pretrain.yaml",
            "fixed": {"max_steps": 1, "model": "../models/m.yaml", "eval.every": 1},
        },
        "params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    }
    file = write(tmp_path / "sweeps" / "s.yaml", spec)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SweepConfig, file)
    assert cfg.output == str(tmp_path / "sweeps" / "out")
    assert cfg.train.config == str(tmp_path / "base" / "pretrain.yaml")
    assert cfg.train.fixed == {"max_steps": 1, "model": str(tmp_path / "models" / "m.yaml"), "eval.every": 1}
    base = read_base(cfg.train.config, "pretrain")
    assert base["data"] == str(tmp_path / "base" / "tokens")
    tree = trial_config(cfg, base, {"optim.lr": 1e-3}, Path("rel") / "0000")
    assert tree["output"] == str(tmp_path / "rel" / "0000")  # absolute: the trial file lives elsewhere
    over = load_config(SweepConfig, file, [f"train.fixed={json.dumps({'data': 'tok2'})}"])
    assert over.train.fixed == {"data": "tok2"}  # an override: relative to the cwd, as given
