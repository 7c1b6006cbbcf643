"""Encryption at rest end to end: prepare, pretrain, checkpoint, resume, generate, serve and export run on
encrypted files and give exactly the plaintext run's numbers, while no output file holds plaintext
weights, tokens or documents; `data verify` needs no key, a wrong or missing key is exit 3.

The tests on the three pretraining runs are slow (`make test-slow`); prepare + tokenize is fast."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from safetensors.torch import load_file

from lmforge import crypt
from lmforge.cli import main
from lmforge.infer.engine import Engine
from lmforge.model.source import load_model
from lmforge.model.tensorfile import load_tensors
from lmforge.serve.app import create_app
from lmforge.serve.state import ServeConfig
from serve_helpers import BackgroundServer
from train_helpers import make_tokens_dir, shakespeare_text

KEY = os.urandom(32)
BASE = [
    "model=tiny",
    "seq_len=32",
    "global_batch=4",
    "micro_batch=2",
    "optim.lr=3e-3",
    "schedule.warmup_steps=1",
    "max_steps=4",
    "checkpoint.every=2",
    "checkpoint.keep=0",
    "eval.every=0",
    "eval.batches=1",
    "eval.sample_tokens=0",
    "progress=false",
    "tensorboard=false",
]


@pytest.fixture(autouse=True)
def _fresh_key_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(crypt.KEY_ENV, raising=False)
    crypt.reset()
    yield
    crypt.reset()


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plaintext tokens + run; the same tokens encrypted (`crypt encrypt`), a run on them, and a run resumed
    from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("crypt")
    key = root / "secret.key"
    key.write_text(KEY.hex())
    tokens = make_tokens_dir(root / "tokens", shakespeare_text(60_000))
    sealed = root / "tokens-enc"
    shutil.copytree(tokens, sealed)
    use_key = f"encryption.key_file={key}"
    assert main(["crypt", "encrypt", str(sealed), use_key]) == 0
    assert main(["pretrain", *BASE, f"data={tokens}", f"output={root / 'plain'}"]) == 0
    assert main(["pretrain", *BASE, f"data={sealed}", f"output={root / 'enc'}", use_key]) == 0
    step2 = root / "enc" / "checkpoints" / "step-000002"
    resumed = [f"data={sealed}", f"output={root / 'resumed'}", f"resume={step2}", use_key]
    assert main(["pretrain", *BASE, *resumed]) == 0
    crypt.reset()
    return {"root": root, "key": key, "tokens": tokens, "sealed": sealed} | {
        n: root / n for n in ("plain", "enc", "resumed")
    }


@pytest.mark.slow  # the shared `runs` fixture: three pretraining runs (~35 s on 2 cores)
def test_encrypted_run_and_resume_are_bit_identical(runs: dict[str, Path]) -> None:
    crypt.configure(runs["key"])
    plain = load_file(str(runs["plain"] / "model" / "model.safetensors"))
    for name in ("enc", "resumed"):
        path = runs[name] / "model" / "model.safetensors"
        assert crypt.is_encrypted(path)
        got = load_tensors(path)
        assert sorted(got) == sorted(plain)
        assert all(torch.equal(got[k], plain[k]) for k in plain), name
    for ckpt in ("enc", "resumed"):  # the optimizer state of the last checkpoint too
        step4 = runs[ckpt] / "checkpoints" / "step-000004"
        osd = load_tensors(step4 / "optimizer.safetensors")
        ref = load_file(str(runs["plain"] / "checkpoints" / "step-000004" / "optimizer.safetensors"))
        assert sorted(osd) == sorted(ref) and all(torch.equal(osd[k], ref[k]) for k in ref)


@pytest.mark.slow  # the shared `runs` fixture: three pretraining runs (~35 s on 2 cores)
def test_no_plaintext_weights_or_tokens_in_any_output_file(runs: dict[str, Path]) -> None:
    """Grep every file of the encrypted runs and tokens for 64-byte slices of the known plaintext."""
    weights = load_file(str(runs["plain"] / "model" / "model.safetensors"))
    needles = [t.contiguous().view(-1).numpy().tobytes()[:64] for t in weights.values() if t.numel() >= 16]
    shard = (runs["tokens"] / "train-00000.bin").read_bytes()
    needles += [shard[i : i + 64] for i in range(0, len(shard) - 64, len(shard) // 16)]
    vocab = (runs["tokens"] / "tokenizer" / "tokenizer.json").read_bytes()
    needles.append(vocab[len(vocab) // 2 : len(vocab) // 2 + 64])
    assert len(needles) >= 20 and all(len(n) == 64 for n in needles)
    plain_hits = sum(
        n in p.read_bytes() for p in files(runs["plain"]) + files(runs["tokens"]) for n in needles
    )
    assert plain_hits >= len(needles)  # the needles are there in plaintext: the grep can find them
    scanned = files(runs["enc"]) + files(runs["resumed"]) + files(runs["sealed"])
    assert len(scanned) > 20
    for path in scanned:
        data = path.read_bytes()
        assert not any(n in data for n in needles), path


@pytest.mark.slow  # the shared `runs` fixture: three pretraining runs (~35 s on 2 cores)
def test_verify_without_key_and_wrong_or_missing_key(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("enc", "resumed", "sealed"):
        assert main(["data", "verify", str(runs[name])]) == 0
    capsys.readouterr()
    gen = [
        "generate",
        f"model={runs['enc']}",
        "prompt=To be",
        "sampling.max_tokens=4",
        "sampling.temperature=0",
    ]
    assert main(gen) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encrypted (key id" in err
    wrong = tmp_path / "wrong.key"
    wrong.write_text(os.urandom(32).hex())
    assert main([*gen, f"encryption.key_file={wrong}"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encrypted with another key" in err
    # a modified ciphertext byte: the manifest names it before any decryption
    bad = tmp_path / "enc"
    shutil.copytree(runs["enc"], bad)
    weights = bad / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(data)
    assert main(["generate", f"model={bad}", "prompt=x", f"encryption.key_file={runs['key']}"]) == 3
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.slow  # the shared `runs` fixture: three pretraining runs (~35 s on 2 cores)
def test_generate_and_serve_from_the_encrypted_model(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gen = ["generate", "prompt=To be, or not", "sampling.max_tokens=8", "sampling.temperature=0"]
    assert main([*gen, f"model={runs['plain']}"]) == 0
    want = capsys.readouterr().out
    assert main([*gen, f"model={runs['enc']}", f"encryption.key_file={runs['key']}"]) == 0
    assert capsys.readouterr().out == want and want.strip()

    answers = []
    for name in ("plain", "enc"):
        crypt.configure(runs["key"] if name == "enc" else None)
        model, tok = load_model(runs[name])
        cfg = ServeConfig(model=name)
        app = create_app(Engine(model, tok, max_batch_size=cfg.max_batch_size), tok, cfg, None)
        with BackgroundServer(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            r = client.completions.create(model=name, prompt="To be, or not", max_tokens=8, temperature=0)
            answers.append(r.choices[0].text)
        app.state.close()
    assert answers[0] == answers[1] and answers[0]


@pytest.mark.slow  # the shared `runs` fixture: three pretraining runs (~35 s on 2 cores)
def test_export_writes_plaintext_only_when_asked(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "hf", str(runs["enc"]), f"output={tmp_path / 'hf'}", "verify=false"]
    key = f"encryption.key_file={runs['key']}"
    assert main([*args, key]) == 2
    err = capsys.readouterr().err
    assert "pass plaintext=true" in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()
    assert main([*args, key, "plaintext=true"]) == 0
    assert not any(crypt.is_encrypted(p) for p in files(tmp_path / "hf"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))  # transformers' names, plaintext
    plain = load_file(str(runs["plain"] / "model" / "model.safetensors"))
    assert sum(t.numel() for t in exported.values()) == sum(t.numel() for t in plain.values())
    emb = next(t for k, t in exported.items() if "embed" in k)
    assert any(torch.equal(emb, t) for t in plain.values())


def test_prepare_and_tokenize_encrypted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Curated documents, the curation report (it quotes documents), staging parts and shards: all sealed."""
    raw = tmp_path / "raw"
    raw.mkdir()
    text = shakespeare_text(40_000)
    paragraphs = [p for p in text.split("\n\n") if len(p) > 80]
    for i in range(0, len(paragraphs), 40):
        (raw / f"{i:04d}.txt").write_text("\n\n".join(paragraphs[i : i + 40]))
    key = tmp_path / "k"
    key.write_text(KEY.hex())
    use = f"encryption.key_file={key}"
    assert main(["prepare", f"input={raw}", f"output={tmp_path / 'cur'}", use]) == 0
    assert (
        main(
            [
                "tokenizer",
                "train",
                f"input={tmp_path / 'cur'}",
                f"output={tmp_path / 'tok'}",
                "vocab_size=300",
                use,
            ]
        )
        == 0
    )
    tok = ["tokenize", f"input={tmp_path / 'cur'}", f"tokenizer={tmp_path / 'tok'}", "workers=2", use]
    assert main([*tok, f"output={tmp_path / 'tokens'}"]) == 0
    needles = [p[:48].encode() for p in paragraphs[:: max(1, len(paragraphs) // 10)]]
    outputs = files(tmp_path / "cur") + files(tmp_path / "tok") + files(tmp_path / "tokens")
    for path in outputs:
        data = path.read_bytes()
        assert not any(n in data for n in needles), path
    sealed = {p.name for p in outputs if crypt.is_encrypted(p)}
    assert {"docs-00000.jsonl.zst", "report.md", "report.json", "tokenizer.json", "train-00000.bin"} <= sealed
    for d in ("cur", "tok", "tokens"):
        assert main(["data", "verify", str(tmp_path / d)]) == 0
    # the same stages in plaintext give the same tokens
    crypt.reset()
    assert main(["prepare", f"input={raw}", f"output={tmp_path / 'cur-p'}"]) == 0
    assert (
        main(
            [
                "tokenizer",
                "train",
                f"input={tmp_path / 'cur-p'}",
                f"output={tmp_path / 'tok-p'}",
                "vocab_size=300",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "tokenize",
                f"input={tmp_path / 'cur-p'}",
                f"tokenizer={tmp_path / 'tok-p'}",
                f"output={tmp_path / 'tokens-p'}",
            ]
        )
        == 0
    )
    crypt.configure(key)
    for split in ("train-00000.bin", "val-00000.bin"):
        a = np.frombuffer(crypt.read_bytes(tmp_path / "tokens" / split), dtype="<u2")
        b = np.fromfile(tmp_path / "tokens-p" / split, dtype="<u2")
        assert len(b) > 1000 and np.array_equal(a, b)


@pytest.mark.slow  # the shared `runs` fixture
def test_lora_finetune_on_the_encrypted_base_is_bit_identical(runs: dict[str, Path], tmp_path: Path) -> None:
    """A LoRA adapter trained on the encrypted base is sealed and equals the one trained on the plaintext."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(f'{{"prompt": "Say {w}", "completion": "{w} {w}"}}\n' for w in "abcdefgh"))
    common = [
        "method=lora",
        f"data.train={sft}",
        "max_steps=3",
        "global_batch=4",
        "micro_batch=2",
        "seq_len=32",
    ]
    common += ["progress=false", "tensorboard=false", "eval.every=0"]
    assert main(["finetune", f"base={runs['plain']}", f"output={tmp_path / 'p'}", *common]) == 0
    key = f"encryption.key_file={runs['key']}"
    assert main(["finetune", f"base={runs['enc']}", f"output={tmp_path / 'e'}", key, *common]) == 0
    sealed = tmp_path / "e" / "adapter" / "adapter_model.safetensors"
    assert crypt.is_encrypted(sealed)
    crypt.configure(runs["key"])
    got = load_tensors(sealed)
    want = load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors"))
    assert len(want) > 0 and sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
