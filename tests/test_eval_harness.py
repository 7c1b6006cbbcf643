"""lm-eval adapter: `lm_eval` runs local task YAMLs (no hub) on an lmforge model, and its per-sample
log-likelihoods and accuracy equal those of lmforge's own scorer; the `python -m lmforge.eval.harness`
command line (lm-eval's CLI with the model registered) runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from infer_helpers import make_tokenizer, save_hf_model  # noqa: E402
from lmforge.eval.tasks import encode_pair, multiple_choice, score_continuations  # noqa: E402
from lmforge.model.source import load_model  # noqa: E402

ROWS = [
    {"query": "To be, or not to", "choices": ["be", "cat", "whale"], "gold": 0},
    {"query": "The king is", "choices": ["dead", "a banana", "not here"], "gold": 1},
    {"query": "O Romeo, Romeo, wherefore art", "choices": ["thou", "the", "you"], "gold": 0},
    {"query": "Enter", "choices": ["HAMLET", "the ghost", "a messenger"], "gold": 2},
]


def _task(tmp: Path, name: str = "lmforge_mc") -> Path:
    data = tmp / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("harness") / "hf"
    save_hf_model("llama", make_tokenizer(), path, seed=2)
    return path


def test_lm_eval_loglikelihoods_equal_ours(model_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness  # noqa: F401  (registers "lmforge")

    tasks = _task(tmp_path)
    out = simple_evaluate(
        model="lmforge",
        model_args=f"path={model_dir},batch_size=4",
        tasks=["lmforge_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        device="cpu",
    )
    model, tok = load_model(model_dir)
    ours = multiple_choice(model, tok, tmp_path / "mc.jsonl")
    res = out["results"]["lmforge_mc"]
    assert res["acc,none"] == ours["acc"] and res["acc_norm,none"] == ours["acc_norm"]
    samples = sorted(out["samples"]["lmforge_mc"], key=lambda s: s["doc_id"])
    for s, row in zip(samples, ROWS, strict=True):
        pairs = [encode_pair(tok, row["query"], " " + c) for c in row["choices"]]
        expected = score_continuations(model, pairs, max_len=model.cfg.max_seq_len)
        got = [r[0] for r in s["resps"]]
        for (ll, greedy), (ell, egreedy) in zip(got, expected, strict=True):
            assert float(ll) == pytest.approx(ell, abs=1e-5) and bool(greedy) == egreedy


@pytest.mark.slow
def test_harness_command_line(model_dir: Path, tmp_path: Path) -> None:
    tasks = _task(tmp_path, "lmforge_cli_mc")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmforge.eval.harness",
        "--model",
        "lmforge",
        "--model_args",
        f"path={model_dir}",
    ]
    cmd += ["--tasks", "lmforge_cli_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tok = load_model(model_dir)
    acc = multiple_choice(model, tok, tmp_path / "mc.jsonl")["acc"]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert result["results"]["lmforge_cli_mc"]["acc,none"] == acc


def test_model_args_batch_size_beside_lm_eval_options(model_dir: Path) -> None:
    """lm-eval passes its own batch_size/device beside model_args: the model_args value wins, no TypeError."""
    from lmforge.eval.harness import LmforgeLM

    cli = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    lm = LmforgeLM.create_from_arg_string(f"path={model_dir},batch_size=8", cli)
    assert lm.batch_size_per_gpu == 8
    assert lm.engine.max_batch_size == 8
    lm = LmforgeLM.create_from_arg_string(f"path={model_dir}", {**cli, "batch_size": 3})
    assert lm.batch_size_per_gpu == 3
    lm = LmforgeLM.create_from_arg_obj({"path": str(model_dir), "batch_size": 5, "device": "cpu"}, cli)
    assert lm.batch_size_per_gpu == 5
