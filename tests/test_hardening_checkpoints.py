"""Checkpoint integrity: every file of a checkpoint is checked against files.json before any of it is
used; a flipped byte anywhere ends `lmforge pretrain --resume auto` with exit 3 and one line naming the
file, and the run directory is left as it was. Also: checkpoints carry model_config.json, a kill while
pruning leaves no half-deleted checkpoint behind, and checkpoints older than the manifest still load.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.model import integrity
from lmforge.train import checkpoint as C
from lmforge.train.finetune import train as finetune
from lmforge.train.pretrain import CONFIG, train
from test_finetune import resume_cfg, task  # noqa: F401 - `task` is a fixture used below
from train_helpers import make_tokens_dir, make_trainer, shakespeare_text

ARGS = [
    "model=tiny",
    "seq_len=32",
    "global_batch=8",
    "micro_batch=4",
    "max_steps=4",
    "eval.every=0",
    "eval.batches=1",
    "eval.sample_tokens=0",
    "checkpoint.every=2",
    "log_every=1",
    "progress=false",
    "tensorboard=false",
    "threads=1",
]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An interrupted pretraining run (`<out>.partial` with checkpoints at steps 2 and 3) and its args."""
    root = tmp_path_factory.mktemp("ckpt")
    tokens = make_tokens_dir(root / "tokens", shakespeare_text(60_000))
    args = [*ARGS, f"data={tokens}"]
    cfg = load_config(CONFIG, overrides=[*args, f"output={root / 'run'}"])
    with pytest.raises(LmforgeError) as e:
        train(cfg, should_stop=lambda step, micro: step == 3 and micro == 1)
    assert e.value.exit_code == 130
    return root / "run.partial", args


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def _data_start(file: Path) -> int:
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8 + int(n)


# (file, which bytes): tensor data, safetensors header, whole JSON files
KINDS = {
    "model weights": ("model.safetensors", "data"),
    "optimizer tensors": ("optimizer.safetensors", "data"),
    "safetensors header": ("model.safetensors", "header"),
    "rng json": ("rng-0.json", "all"),
    "optimizer json": ("optimizer.json", "all"),
    "state json": ("state.json", "all"),
    "model config": ("model_config.json", "all"),
    "manifest": ("files.json", "all"),
}


def _flip(file: Path, region: str, seed: int) -> None:
    data = bytearray(file.read_bytes())
    lo, hi = 0, len(data)
    if region != "all":
        start = _data_start(file)
        lo, hi = (start, len(data)) if region == "data" else (0, start)
    rng = random.Random(seed)
    pos = rng.randrange(lo, hi)
    data[pos] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flipped_byte_is_refused_naming_the_file(
    unfinished: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    seed: int,
) -> None:
    src, args = unfinished
    run = tmp_path / "run.partial"
    shutil.copytree(src, run)
    name, region = KINDS[kind]
    target = run / "checkpoints" / "step-000003" / name
    _flip(target, region, seed)
    before = _hashes(run)
    capsys.readouterr()
    rc = main(["pretrain", *args, f"output={tmp_path / 'run'}", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], err
    after = _hashes(run)
    # Nothing lost or changed; config.yaml is rewritten (it records resume=auto) and nothing else.
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"
    }


def test_checkpoints_carry_model_config_and_a_manifest(unfinished: tuple[Path, list[str]]) -> None:
    src, _ = unfinished
    ckpt = src / "checkpoints" / "step-000003"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "files.json",
        "model.safetensors",
        "model_config.json",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-0.json",
        "state.json",
    ]
    manifest = json.loads((ckpt / "files.json").read_text())
    assert sorted(manifest["files"]) == [n for n in names if n != "files.json"]
    state = json.loads((ckpt / "state.json").read_text())
    mcfg = json.loads((ckpt / "model_config.json").read_text())
    assert mcfg["vocab_size"] == 512 and mcfg["n_layers"] >= 1 and state["step"] == 3
    C.verify_checkpoint(ckpt)  # intact: no error


def test_a_missing_or_extra_file_is_refused(unfinished: tuple[Path, list[str]], tmp_path: Path) -> None:
    ckpt = tmp_path / "step-000003"
    shutil.copytree(unfinished[0] / "checkpoints" / "step-000003", ckpt)
    (ckpt / "rng-1.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"rng-1\.json: not listed"):
        C.verify_checkpoint(ckpt)
    (ckpt / "rng-1.json").unlink()
    (ckpt / "optimizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"optimizer\.json: missing"):
        C.verify_checkpoint(ckpt)


def test_a_checkpoint_without_manifest_still_loads(
    unfinished: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, args = unfinished
    run = tmp_path / "run.partial"
    shutil.copytree(src, run)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "files.json").unlink()
    capsys.readouterr()
    assert main(["pretrain", *args, f"output={tmp_path / 'run'}", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert err.count("has no files.json") == 1 and "resumed from" in err


def test_an_old_checkpoint_with_bad_json_is_one_line(
    unfinished: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, args = unfinished
    for name in ("rng-0.json", "optimizer.json", "state.json"):
        run = tmp_path / name / "run.partial"
        shutil.copytree(src, run)
        ckpt = run / "checkpoints" / "step-000003"
        (ckpt / "files.json").unlink()
        (ckpt / name).write_text('{"torch": 1')
        capsys.readouterr()
        rc = main(["pretrain", *args, f"output={run.parent / 'run'}", "--resume", "auto"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 3 and len(lines) == 2 and str(ckpt / name) in lines[1], lines  # the note, the error


def test_verification_streams_each_file_once(unfinished: tuple[Path, list[str]], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = unfinished[0] / "checkpoints" / "step-000003"
    seen: list[str] = []
    real = integrity.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    model = torch.nn.Module()
    with pytest.raises(Exception):  # noqa: B017 - the bare module has no parameters to load into
        C.load_checkpoint(ckpt, model, None)
    assert sorted(seen) == sorted(json.loads((ckpt / "files.json").read_text())["files"])


def test_a_kill_while_pruning_leaves_nothing_resumable_behind(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    straight = make_trainer(tmp_path / "straight", steps=6, checkpoint_every=2, keep=1)
    straight.run()
    real = shutil.rmtree

    def killed_midway(path, *a, **kw):  # type: ignore[no-untyped-def]
        path = Path(path)
        if path.name.startswith(C.PRUNED):
            (path / "optimizer.safetensors").unlink()  # part of it is gone, then the process dies
            raise KeyboardInterrupt("killed while pruning")
        return real(path, *a, **kw)

    monkeypatch.setattr(C.shutil, "rmtree", killed_midway)
    t = make_trainer(tmp_path / "cut", steps=6, checkpoint_every=2, keep=1)
    with pytest.raises(KeyboardInterrupt):
        t.run()  # dies pruning step 2 after saving step 4
    root = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["pruned-step-000002", "step-000004"]
    assert integrity.latest_checkpoint(root) == root / "step-000004"
    monkeypatch.setattr(C.shutil, "rmtree", real)

    again = make_trainer(tmp_path / "cut", steps=6, checkpoint_every=2, keep=1)
    assert again.resume("auto") == root / "step-000004" and again.state.step == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]  # the leftover is gone at start
    again.run()
    assert sorted(p.name for p in root.iterdir()) == ["step-000006"]
    a = C.load_weights(root / "step-000006")
    b = C.load_weights(tmp_path / "straight" / "checkpoints" / "step-000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_verification_cost(tmp_path: Path) -> None:
    """~200 MB hashed: prints the cost per GB (measured: see the commit message)."""
    import time

    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        for _ in range(200):
            out.write(random.randbytes(1 << 20))
    t0 = time.perf_counter()
    C.sha256_file(f)
    dt = time.perf_counter() - t0
    print(f"sha256: {dt / (200 / 1024):.2f} s per GB")
    assert dt < 60


def test_a_lora_checkpoint_is_verified_too(task: Path, tmp_path: Path) -> None:  # noqa: F811
    """finetune (and align dpo) resume through the same load_checkpoint: an adapter-only LoRA checkpoint
    with one flipped byte is refused naming the file; the intact one resumes."""
    cfg = resume_cfg(task, tmp_path / "lora", "lora")
    with pytest.raises(LmforgeError):
        finetune(cfg, should_stop=lambda step, micro: step == 5 and micro == 0)
    ckpt = tmp_path / "lora.partial" / "checkpoints" / "step-000005"
    assert (ckpt / "model_config.json").is_file()  # the trained model's architecture, as for pretrain
    assert all(".lora_" in k for k in C.load_weights(ckpt))  # adapter tensors only
    good = (ckpt / "model.safetensors").read_bytes()
    _flip(ckpt / "model.safetensors", "data", 0)
    with pytest.raises(IntegrityError, match=re.escape(f"{ckpt / 'model.safetensors'}: SHA-256 mismatch")):
        finetune(cfg.model_copy(update={"resume": "auto"}))
    (ckpt / "model.safetensors").write_bytes(good)
    assert finetune(cfg.model_copy(update={"resume": "auto"})) == 0
