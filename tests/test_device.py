"""The one device picker (lmforge.device): what 'auto' means, and a missing device as a one-line ConfigError."""

from __future__ import annotations

import pytest
import torch

from lmforge import cli
from lmforge.device import available_devices, pick_device
from lmforge.errors import ConfigError


def machine(monkeypatch: pytest.MonkeyPatch, gpus: int, mps: bool = False) -> list[int]:
    """Pretend this machine has `gpus` CUDA devices; returns the list set_device calls land in."""
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return current


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, gpus=0)
    assert pick_device("auto") == torch.device("cpu") and available_devices() == ["cpu"]
    current = machine(monkeypatch, gpus=2)
    assert pick_device("auto") == torch.device("cuda") and current == []  # inference: the current GPU
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1) and current == [1]  # a torchrun rank
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu", local_rank=1) == torch.device("cpu")
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    ("gpus", "name", "message"),
    [
        (0, "cuda", r"^device: 'cuda' requested but this machine has no such device \(available: cpu\)$"),
        (0, "cuda:3", r"^device: 'cuda:3' requested .*\(available: cpu\)$"),
        (2, "cuda:3", r"^device: 'cuda:3' requested .*\(available: cpu, cuda:0, cuda:1\)$"),
        (0, "mps", r"^device: 'mps' requested .*\(available: cpu\)$"),
        (
            0,
            "gpu",
            r"^device: unknown device 'gpu'; expected auto, cpu, cuda, cuda:N or mps \(available: cpu\)$",
        ),
        (0, "cuda:x", r"^device: unknown device 'cuda:x'"),
    ],
)
def test_a_device_this_machine_lacks_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, gpus: int, name: str, message: str
) -> None:
    machine(monkeypatch, gpus=gpus)
    with pytest.raises(ConfigError, match=message) as e:
        pick_device(name)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_the_error_names_the_key_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, gpus=0)
    with pytest.raises(ConfigError, match=r"^model_args: device: 'cuda' requested"):
        pick_device("cuda", key="model_args: device")


def test_generate_on_a_missing_gpu_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    machine(monkeypatch, gpus=0)
    assert cli.main(["generate", "model=does-not-matter", "prompt=x", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: device: 'cuda' requested but this machine has no such device (available: cpu)\n"
