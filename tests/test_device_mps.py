"""Apple Silicon: the device decisions as pure functions of the machine's facts, and a real MPS run where
there is one (skipped elsewhere, with the reason)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.device import Facts, available_devices, check_training, mps_precision, resolve
from lmforge.errors import ConfigError
from lmforge.train.common import precision_setup
from lmforge.train.metrics import read_metrics
from train_helpers import make_tokens_dir, shakespeare_text

MAC = Facts(mps_built=True, mps_available=True, macos_14=True, torch_version=(2, 13), system="Darwin")
OLD_MAC = Facts(mps_built=True, mps_available=True, macos_14=False, torch_version=(2, 4), system="Darwin")
LINUX_CPU = Facts(torch_version=(2, 13))
INTEL_MAC = Facts(mps_built=True, mps_available=False, torch_version=(2, 13), system="Darwin")
GPU_BOX = Facts(cuda_count=2, torch_version=(2, 13))


@pytest.mark.parametrize(
    ("name", "f", "expected"),
    [
        ("auto", MAC, "cpu"),  # MPS lacks operators: chosen by name only
        ("auto", GPU_BOX, "cuda"),
        ("auto", LINUX_CPU, "cpu"),
        ("mps", MAC, "mps"),
        ("mps:0", MAC, "mps:0"),
        ("cuda:1", GPU_BOX, "cuda:1"),
        ("cpu", MAC, "cpu"),
    ],
)
def test_resolve_picks_the_device_the_name_means_here(name: str, f: Facts, expected: str) -> None:
    assert resolve(name, f) == expected


@pytest.mark.parametrize(
    ("f", "message"),
    [
        (
            LINUX_CPU,
            r"^device: 'mps' requested but MPS is not available: this torch 2\.13 has no MPS support "
            r"\(available: cpu\)$",
        ),
        (
            INTEL_MAC,
            r"^device: 'mps' requested but MPS is not available: this torch has MPS but this Darwin machine "
            r"cannot run it \(needs Apple Silicon, macOS 12\.3\+\) \(available: cpu\)$",
        ),
        (GPU_BOX, r"^device: 'mps' requested .*\(available: cpu, cuda:0, cuda:1\)$"),
    ],
)
def test_mps_where_it_is_missing_is_one_line_naming_what_was_found(f: Facts, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        resolve("mps", f)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_available_devices_lists_mps_only_where_it_runs() -> None:
    assert available_devices(MAC) == ["cpu", "mps"]
    assert available_devices(INTEL_MAC) == ["cpu"]
    assert available_devices(GPU_BOX) == ["cpu", "cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    ("precision", "f", "expected"),
    [
        ("auto", MAC, "fp32"),
        ("fp32", OLD_MAC, "fp32"),
        ("fp16", MAC, "fp16"),
        ("bf16", MAC, "bf16"),
        ("fp16", OLD_MAC, r"^precision: fp16 autocast on mps needs torch 2\.5\+; use precision=fp32$"),
        (
            "bf16",
            Facts(mps_built=True, mps_available=True, macos_14=False, torch_version=(2, 13)),
            r"^precision: bf16 autocast on mps needs torch 2\.6\+ and macOS 14\+; use precision=fp32 or fp16$",
        ),
    ],
)
def test_mps_precision_follows_torch_and_macos(precision: str, f: Facts, expected: str) -> None:
    if expected.startswith("^"):
        with pytest.raises(ConfigError, match=expected):
            mps_precision(precision, f)
    else:
        assert mps_precision(precision, f) == expected


def test_mps_refuses_several_processes_and_compile_with_one_line() -> None:
    mps = torch.device("mps")
    with pytest.raises(
        ConfigError, match=r"^device: mps trains in one process; 2 processes \(DDP/FSDP\) need"
    ):
        check_training(mps, world_size=2)
    with pytest.raises(ConfigError, match=r"^compile: torch.compile is not used on device=mps"):
        check_training(mps, world_size=1, compile=True)
    check_training(mps, world_size=1)
    check_training(torch.device("cpu"), world_size=2, compile=True)  # only MPS is limited


def test_precision_auto_follows_an_accelerate_config(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SimpleNamespace(precision="auto")
    cpu = torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    prec, _, autocast, scaler = precision_setup(cfg, cpu)
    assert prec == "bf16" and scaler is None and autocast().fast_dtype == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert precision_setup(cfg, cpu)[0] == "fp32" and precision_setup(cfg, cpu)[2] is contextlib.nullcontext
    # an explicit precision key wins over the accelerate config
    assert precision_setup(SimpleNamespace(precision="fp32"), cpu)[0] == "fp32"


def test_every_command_accepts_device_mps_in_its_schema() -> None:
    from lmforge.eval.run import EvalConfig
    from lmforge.infer.chat import ChatConfig
    from lmforge.infer.generate import GenerateConfig
    from lmforge.serve.state import ServeConfig
    from lmforge.train.common import TrainConfig

    for schema in (TrainConfig, GenerateConfig, ChatConfig, EvalConfig):
        assert "mps" in str(schema.model_fields["device"].annotation), schema
    assert ServeConfig.model_fields["device"].annotation is str  # any torch device name, checked at start


MPS = torch.backends.mps.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not MPS, reason=f"MPS is not available here (torch {torch.__version__}, {sys.platform})")
def test_pretrain_and_generate_run_on_mps(tmp_path: Path) -> None:
    tokens = make_tokens_dir(tmp_path / "tokens", shakespeare_text(100_000))
    out = tmp_path / "run"
    common = [sys.executable, "-m", "lmforge"]
    train = [
        *common,
        "pretrain",
        f"data={tokens}",
        "model=tiny",
        f"output={out}",
        "device=mps",
        "max_steps=4",
        "global_batch=4",
        "micro_batch=2",
        "seq_len=32",
        "eval.every=0",
        "checkpoint.every=0",
        "progress=false",
    ]
    done = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_metrics(out / "metrics.jsonl", "train")) == 4
    gen = [*common, "generate", f"model={out / 'model'}", "prompt=the", "device=mps", "max_new_tokens=4"]
    done = subprocess.run(gen, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
