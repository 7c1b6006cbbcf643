"""Hub ids as model sources (model/hub.py): a real hub cache on disk, read by huggingface_hub's own cache
functions, resolves `ORG/NAME[@REV]` for generate, finetune and `model pull` with HF_HUB_OFFLINE=1 and no
network; the loaded weights are the snapshot's, bit for bit; what is not cached fails in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, scan_cache_dir, try_to_load_from_cache

from hub_helpers import add_snapshot, commit_hash
from infer_helpers import VOCAB, make_tokenizer, save_hf_model
from lmforge.cli import main
from lmforge.model.hub import is_hub_id, pinned
from lmforge.model.source import load_model

REPO = "tiny-org/tiny-llama"
OLD, NEW = commit_hash("v1"), commit_hash("v2")
IDS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME with REPO at two commits (main -> NEW) and a repo holding only pickled weights."""
    home = tmp_path_factory.mktemp("hf_home")
    src = tmp_path_factory.mktemp("src")
    tok = make_tokenizer()
    save_hf_model("llama", tok, src / "v1", seed=0)
    save_hf_model("llama", tok, src / "v2", seed=1)
    (src / "v2" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny-llama\n")
    add_snapshot(home / "hub", REPO, src / "v1", OLD, ref=None)
    add_snapshot(home / "hub", REPO, src / "v2", NEW)
    (src / "bin").mkdir()
    (src / "bin" / "config.json").write_text((src / "v1" / "config.json").read_text())
    (src / "bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not loaded")
    add_snapshot(home / "hub", "pkl-org/bin-only", src / "bin", commit_hash("bin"))
    return home


@pytest.fixture
def offline(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process reads the cache in `home`, offline; returns the cache folder."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import, so patched too
    return home / "hub"


def snap(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def test_the_layout_is_a_cache_huggingface_hub_reads(offline: Path) -> None:
    info = {r.repo_id: r for r in scan_cache_dir(offline).repos}
    assert sorted(info) == ["pkl-org/bin-only", REPO]
    revs = {r.commit_hash: r.refs for r in info[REPO].revisions}
    assert revs == {OLD: frozenset(), NEW: frozenset({"main"})}
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=offline) == str(
        snap(offline, NEW) / "config.json"
    )
    old = try_to_load_from_cache(REPO, "model.safetensors", cache_dir=offline, revision=OLD)
    assert old == str(snap(offline, OLD) / "model.safetensors")


def test_what_counts_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("Qwen/Qwen2.5-0.5B@v1.0")
    assert not is_hub_id("runs/sft")  # an existing local folder wins
    for spec in ("tiny", "/abs/x", "./a/b", "a/b/c", "../a/b", "configs/model.yaml", "x/model.safetensors"):
        assert not is_hub_id(spec), spec


def test_hub_ids_load_the_snapshot_weights_and_revisions_pin(offline: Path) -> None:
    def logits(spec: str | Path) -> torch.Tensor:
        model, _ = load_model(spec)
        with torch.no_grad():
            return model(IDS)

    new, old = logits(snap(offline, NEW)), logits(snap(offline, OLD))
    assert not torch.equal(new, old)
    assert torch.equal(logits(REPO), new)  # main
    assert torch.equal(logits(f"{REPO}@main"), new)
    assert torch.equal(logits(f"{REPO}@{OLD}"), old)
    assert pinned(REPO) == f"{REPO}@{NEW}" and pinned(f"{REPO}@{OLD}") == f"{REPO}@{OLD}"


def test_generate_in_a_new_process_offline_matches_the_folder(offline: Path, tmp_path: Path) -> None:
    """The environment variables alone (HF_HOME, HF_HUB_OFFLINE=1) steer a fresh `lmforge generate`."""
    common = ["prompt=To be, or not", "sampling.max_tokens=12", "sampling.temperature=0", "threads=1"]
    assert main(["generate", f"model={snap(offline, NEW)}", *common, f"output={tmp_path / 'a.jsonl'}"]) == 0
    env = {**os.environ, "PYTHONPATH": SRC}  # HF_HOME and HF_HUB_OFFLINE=1 from the fixture
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "generate",
            f"model={REPO}",
            *common,
            f"output={tmp_path / 'b.jsonl'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.jsonl", "b.jsonl"))
    assert b["text"] == a["text"] and b["completion_tokens"] == a["completion_tokens"] == 12


def test_finetune_from_a_hub_id_equals_the_folder_and_pins_the_commit(offline: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("yes", "no", "maybe", "never")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "method=full", f"data.train={data}", "seq_len=32", "global_batch=4", "micro_batch=4", "max_steps=3",
        "threads=1", "progress=false", "tensorboard=false", "eval.every=0",
    ]  # fmt: skip
    assert main(["finetune", f"base={REPO}", f"output={tmp_path / 'hub'}", *common]) == 0
    assert main(["finetune", f"base={snap(offline, NEW)}", f"output={tmp_path / 'dir'}", *common]) == 0
    cfg = yaml.safe_load((tmp_path / "hub" / "config.yaml").read_text())
    assert cfg["base"] == f"{REPO}@{NEW}"  # a rerun loads the same weights even after main moves
    card = ModelCard.load(tmp_path / "hub" / "model" / "README.md").data
    assert (card.base_model, card.base_model_revision, card.license) == (REPO, NEW, "apache-2.0")
    a, _ = load_model(tmp_path / "hub")
    b, _ = load_model(tmp_path / "dir")
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # A LoRA adapter records the pinned id as its base, and loads (base from the cache + adapter) offline.
    lora = ["finetune", f"base={REPO}", f"output={tmp_path / 'lora'}", *common, "method=lora"]
    assert main(lora) == 0
    info = json.loads((tmp_path / "lora" / "adapter" / "lmforge_base.json").read_text())
    assert info["base"] == f"{REPO}@{NEW}"
    model, _ = load_model(tmp_path / "lora")
    assert model(IDS).shape == (1, IDS.shape[1], VOCAB)


def test_pull_prints_the_snapshot_folder(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "pull", REPO]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(snap(offline, NEW)) and f"{REPO}@{NEW}" in out.err
    assert main(["model", "pull", f"{REPO}@{OLD}"]) == 0
    assert capsys.readouterr().out.strip() == str(snap(offline, OLD))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "model=nobody/missing", "prompt=hi"], "lmforge model pull nobody/missing"),
        (["finetune", "base=nobody/missing", "data.train=x.jsonl", "output=o"], "HF_HUB_OFFLINE is set"),
        (["model", "pull", f"{REPO}@{commit_hash('nope')}"], "not in the Hugging Face cache"),
        (["model", "pull", "pkl-org/bin-only"], "no safetensors weights"),
        (["model", "pull", "runs/x.yaml"], "is not a hub id"),
    ],
)
def test_what_cannot_be_resolved_is_one_line_exit_2(
    offline: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
