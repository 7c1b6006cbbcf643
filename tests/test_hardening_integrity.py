"""Integrity of everything a command loads: a byte flipped at a seeded random position in any kind of file
(weights, checkpoint state, tokenizer, adapter, quantized weights, token shards) makes every command that
loads that file exit 3 with exactly one stderr line naming it, before any tensor is used. A folder from
another tool (an HF download, no manifest) loads with one notice; LMFORGE_NO_VERIFY=1 skips with a warning.

    pytest -q tests/test_hardening_integrity.py
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from infer_helpers import make_tokenizer, save_hf_model
from lmforge.cli import main
from lmforge.data.manifest import verify_manifest, write_manifest
from lmforge.model.integrity import NO_VERIFY
from lmforge.model.source import load_model
from lmforge.tokenizer import load_tokenizer
from tokenizer_corpus import write_curated
from train_helpers import make_tokens_dir, shakespeare_text

QUIET = ["threads=1", "progress=false", "tensorboard=false"]
PRETRAIN = ["model=tiny", "seq_len=32", "global_batch=8", "micro_batch=4", "max_steps=4", "eval.every=0"]
PRETRAIN += ["eval.batches=1", "eval.sample_tokens=0", "checkpoint.every=2", "log_every=1", *QUIET]
DPO_DATA = Path(__file__).resolve().parents[1] / "configs" / "align" / "data" / "shakespeare-prefs.jsonl"
CKPT = "checkpoints/step-000004"


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny artifacts, built once: tokens dir, pretraining run, int8 folder, LoRA run, tokenizer, text."""
    root = tmp_path_factory.mktemp("integrity")
    text = shakespeare_text(60_000)
    tokens = make_tokens_dir(root / "tokens", text)
    run = root / "run"
    assert main(["pretrain", *PRETRAIN, f"data={tokens}", f"output={run}"]) == 0
    quant = ["method=int8", "report.repeats=1", "report.decode_tokens=2", "threads=1"]
    assert main(["quantize", f"model={run}", f"output={root / 'int8'}", *quant]) == 0
    lines = [json.dumps({"prompt": f"count {i}", "completion": f" {i + 1}"}) for i in range(40)]
    (root / "sft.jsonl").write_text("\n".join(lines) + "\n")
    assert (
        main(
            [
                "finetune",
                f"base={run}",
                f"data.train={root / 'sft.jsonl'}",
                f"output={root / 'sft'}",
                "method=lora",
                "max_steps=1",
                "seq_len=32",
                "global_batch=4",
                "micro_batch=4",
                *QUIET,
            ]
        )
        == 0
    )
    shutil.copytree(tokens / "tokenizer", root / "tok")
    write_manifest(root / "tok", stage="tokenizer train")
    write_curated(root / "curated", [{"id": "a", "text": text[:3000]}])
    (root / "text.txt").write_text(text[:2000])
    for d in ("tokens", "run", "int8", "sft", "tok"):
        verify_manifest(root / d)
    return {
        "root": root,
        "tokens": tokens,
        "run": run,
        "int8": root / "int8",
        "sft": root / "sft",
        "tok": root / "tok",
    }


# kind -> (artifact, file inside it)
KINDS = {
    "model weights": ("run", "model/model.safetensors"),
    "model config": ("run", "model/model_config.json"),
    "tokenizer.json": ("run", "model/tokenizer.json"),
    "checkpoint weights": ("run", f"{CKPT}/model.safetensors"),
    "checkpoint optimizer tensors": ("run", f"{CKPT}/optimizer.safetensors"),
    "checkpoint rng json": ("run", f"{CKPT}/rng-0.json"),
    "checkpoint state json": ("run", f"{CKPT}/state.json"),
    "checkpoint optimizer json": ("run", f"{CKPT}/optimizer.json"),
    "adapter weights": ("sft", "adapter/adapter_model.safetensors"),
    "adapter config": ("sft", "adapter/adapter_config.json"),
    "adapter tokenizer": ("sft", "adapter/tokenizer.json"),
    "quantized weights": ("int8", "model.safetensors"),
    "quant config": ("int8", "quant_config.json"),
    "token shard": ("tokens", "train-00000.bin"),
    "token index": ("tokens", "index.json"),
    "tokenizer folder": ("tok", "tokenizer.json"),
}
MODEL_USERS = ["generate", "eval", "quantize", "export hf", "finetune", "align dpo", "serve"]
# kind -> the commands that load that file, and which folder each is pointed at ("" = the artifact itself)
CASES = {
    "model weights": [(c, "") for c in MODEL_USERS],
    "model config": [(c, "") for c in ("generate", "export hf", "finetune")],
    "tokenizer.json": [(c, "") for c in MODEL_USERS],
    "checkpoint weights": [
        ("generate", CKPT),
        ("eval", CKPT),
        ("export hf", CKPT),
        ("pretrain --resume", ""),
    ],
    "checkpoint optimizer tensors": [("pretrain --resume", "")],
    "checkpoint rng json": [("pretrain --resume", "")],
    "checkpoint state json": [("pretrain --resume", "")],
    "checkpoint optimizer json": [("pretrain --resume", "")],
    "adapter weights": [("generate", ""), ("eval", ""), ("lora merge", ""), ("align dpo", "")],
    "adapter config": [("generate", ""), ("lora merge", "")],
    "adapter tokenizer": [("generate", ""), ("lora merge", "")],  # lora merge copies it into its output
    "quantized weights": [("generate", ""), ("eval", ""), ("serve", "")],
    "quant config": [("generate", "")],
    "token shard": [("pretrain", "")],
    "token index": [("pretrain", "")],
    "tokenizer folder": [("tokenize", "")],
}
PARAMS = [(kind, cmd, sub) for kind, cases in CASES.items() for cmd, sub in cases]


def command(cmd: str, model: Path, art: dict[str, Path], out: Path) -> list[str]:
    """The argv of `cmd` loading `model` (a model folder / run, or the tokens / tokenizer dir)."""
    root = art["root"]
    task = f"tasks=[{{type: perplexity, name: t, data: [{root / 'text.txt'}], seq_len: 32}}]"
    steps = ["max_steps=1", "global_batch=4", "micro_batch=4", *QUIET]
    return {
        "generate": ["generate", f"model={model}", "prompt=ROMEO.", "sampling.max_tokens=2", "threads=1"],
        "eval": ["eval", f"model={model}", f"output={out}", task, "threads=1"],
        "quantize": ["quantize", f"model={model}", f"output={out}", "method=int8", "threads=1"],
        "export hf": ["export", "hf", str(model), f"output={out}"],
        "lora merge": ["lora", "merge", f"adapter={model}", f"output={out}"],
        "finetune": [
            "finetune",
            f"base={model}",
            f"data.train={root / 'sft.jsonl'}",
            f"output={out}",
            "seq_len=32",
            *steps,
        ],
        "align dpo": [
            "align",
            "dpo",
            f"model={model}",
            f"data={DPO_DATA}",
            f"output={out}",
            "max_len=64",
            "max_prompt_len=32",
            *steps,
        ],
        "serve": ["serve", f"model={model}", "port=0", "threads=1"],
        "pretrain --resume": [
            "pretrain",
            *PRETRAIN,
            f"data={art['tokens']}",
            f"output={model}",
            "--resume",
            "auto",
        ],
        "pretrain": ["pretrain", *PRETRAIN, f"data={model}", f"output={out}"],
        "tokenize": ["tokenize", f"input={root / 'curated'}", f"tokenizer={model}", f"output={out}"],
    }[cmd]


def flip(file: Path, seed: int) -> int:
    """Flip one bit at a seeded random position (the tensor data of a safetensors file); returns it."""
    data = bytearray(file.read_bytes())
    lo = 8 + struct.unpack("<Q", data[:8])[0] if file.suffix == ".safetensors" else 0
    rng = random.Random(seed)
    pos = rng.randrange(lo, len(data))
    data[pos] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return pos


@pytest.mark.parametrize(("kind", "cmd", "sub"), PARAMS, ids=[f"{k}-{c}-{s or 'root'}" for k, c, s in PARAMS])
def test_a_flipped_byte_stops_every_command_that_loads_the_file(
    art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, cmd: str, sub: str
) -> None:
    name, rel = KINDS[kind]
    copy = tmp_path / name
    shutil.copytree(art[name], copy)
    target = copy / rel
    flip(target, seed=zlib.crc32(f"{kind}/{cmd}".encode()))
    capsys.readouterr()
    rc = main(command(cmd, copy / sub if sub else copy, art, tmp_path / "out"))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 3, err
    # A resume reopens a finished run as <run>.partial first (pretraining's own rule): the file is named there.
    named = copy.with_name(f"{copy.name}.partial") / rel if cmd == "pretrain --resume" else target
    assert len(lines) == 1 and str(named) in lines[0] and "SHA-256" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_every_loadable_folder_is_covered_by_a_manifest(art: dict[str, Path], tmp_path: Path) -> None:
    """Intact artifacts load with nothing on stderr: each folder is covered (its own, its run's, its tokens dir's)."""
    exported = tmp_path / "export"
    assert main(["export", "hf", str(art["run"]), f"output={exported}", "verify=false"]) == 0
    verify_manifest(exported)
    for folder in (art["run"], art["run"] / "model", art["run"] / CKPT, art["int8"], art["sft"], exported):
        load_model(folder)
    load_tokenizer(art["tokens"] / "tokenizer")


def test_a_folder_without_manifest_loads_with_one_notice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = tmp_path / "hf"
    save_hf_model("llama", make_tokenizer(), hf)
    assert not (hf / "manifest.json").exists()
    capsys.readouterr()
    assert main(["generate", f"model={hf}", "prompt=Hi", "sampling.max_tokens=2", "threads=1"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if "manifest" in line] == [f"note: {hf}: no manifest: not verified"]


def test_the_skip_flag_warns_and_loads_unverified(
    art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(art["run"], run)
    weights = run / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start + 4 * 1000] ^= 1  # the lowest mantissa bit of one fp32 weight: still a working model
    weights.write_bytes(bytes(data))
    args = ["generate", f"model={run}", "prompt=ROMEO.", "sampling.max_tokens=2", "threads=1"]
    capsys.readouterr()
    assert main(args) == 3
    assert str(weights) in capsys.readouterr().err
    monkeypatch.setenv(NO_VERIFY, "1")
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if NO_VERIFY in line]
    assert warnings == [f"warning: {NO_VERIFY}=1: models, checkpoints and tokenizers are loaded unverified"]
