"""`lmforge data arith-report`: held-out accuracy before and after, from two `lmforge eval` reports of the
same generation task (the RL demo's last stage; the library is data/arith.py).

    lmforge data arith-report before=runs/demo-rl/eval-sft after=runs/demo-rl/eval-grpo output=runs/demo-rl/accuracy
"""

from __future__ import annotations

import os
import time

from pydantic import Field

from lmforge.config import ConfigFsPath, Section, parse_command, save_config
from lmforge.data.arith import compare
from lmforge.data.manifest import ensure_verified, write_manifest
from lmforge.io import atomic_write_json, read_json_object, staged_output

REPORT = "accuracy.json"


class ArithReportConfig(Section):
    before: ConfigFsPath = Field(
        ..., description="`lmforge eval` output folder of the model before (the SFT model)"
    )
    after: ConfigFsPath = Field(
        ..., description="`lmforge eval` output folder of the model after (the GRPO model)"
    )
    task: str = Field("heldout", description="name of the generation task in both reports")
    output: ConfigFsPath = Field(..., description="folder to write accuracy.json in")
    overwrite: bool = Field(False, description="replace an existing output folder")


CONFIG = ArithReportConfig


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        ArithReportConfig,
        "data arith-report",
        "Held-out accuracy (greedy exact match) before and after, from two `lmforge eval` reports of the "
        "same generation task; writes accuracy.json with the gain in points and the load average.",
        "lmforge data arith-report before=runs/demo-rl/eval-sft after=runs/demo-rl/eval-grpo "
        "output=runs/demo-rl/accuracy",
    )
    for d in (cfg.before, cfg.after):
        ensure_verified(d)
    before = read_json_object(cfg.before / "report.json", "before")
    after = read_json_object(cfg.after / "report.json", "after")
    result = compare(before, after, cfg.task, (str(cfg.before), str(cfg.after)))
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        atomic_write_json(stage / REPORT, result)
        save_config(cfg, stage, "data arith-report")
        write_manifest(stage, stage="data arith-report")
    b, a = result["before"]["accuracy"], result["after"]["accuracy"]
    print(
        f"held-out accuracy ({result['n']} problems, greedy): before {100 * b:.1f}%  after {100 * a:.1f}%  "
        f"gain {result['gain_points']:+.1f} points -> {cfg.output / REPORT}"
    )
    return 0


__all__ = ["CONFIG", "REPORT", "ArithReportConfig", "main"]
