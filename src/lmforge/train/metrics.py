"""Where training numbers go: `metrics.jsonl` (always), TensorBoard and W&B (when installed and asked).

Only rank 0 logs. Each record is one JSON line `{"kind": "train"|"eval"|"event", "step": ..., ...}`, so a
run can be plotted or compared with a few lines of Python. MFU (model FLOPs utilisation) is the model's
training FLOPs per second over the device's dense bf16 peak; it is reported on GPUs only, as are the
device's peak memory (`cuda_mem_gb`, torch's max_memory_allocated) and utilisation (`cuda_util`, percent of
the last sample period busy, when pynvml is installed).

pretrain, finetune and align dpo log through the shared loop, so their `train/...` names are the same.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.io import iter_jsonl

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s, or None on CPU or an unknown GPU (then no MFU is shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def device_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory (GiB) and utilisation (%) of a CUDA device; nothing on CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    out = {"cuda_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    with contextlib.suppress(Exception):  # pynvml missing or NVML unavailable: memory alone
        out["cuda_util"] = float(torch.cuda.utilization(device))
    return out


class MetricsLogger:
    def __init__(
        self, run_dir: Path, *, enabled: bool, tensorboard: bool, wandb_project: str | None, config: Any
    ) -> None:
        self.enabled = enabled
        self._file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is the optional [track] extra
                self._tb = None
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))
            except ImportError:
                self.log("event", 0, {"message": "wandb requested but not installed; skipped"})

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
            for k, v in values.items():
                if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
                    self._tb.add_text(f"{kind}/{k}", "\n\n".join(v), step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    return [r for _, r in iter_jsonl(Path(path)) if kind is None or r.get("kind") == kind]
