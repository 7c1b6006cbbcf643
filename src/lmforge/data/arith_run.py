"""`lmforge data arith` writes the addition task of the RL demo; `lmforge data arith-report` compares the
held-out accuracy of two `lmforge eval` reports (the library is data/arith.py).

    lmforge data arith output=runs/demo-rl/data digits=2 seed=0
    lmforge data arith-report before=runs/demo-rl/eval-sft after=runs/demo-rl/eval-grpo output=runs/demo-rl/accuracy
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import Field
from rich.console import Console

from lmforge.config import Section, parse_command, save_config
from lmforge.data.arith import TOKENIZER, compare, make_task, write_task
from lmforge.data.manifest import ensure_verified, write_manifest
from lmforge.io import atomic_write_json, read_json_object, staged_output

REPORT = "accuracy.json"


class ArithConfig(Section):
    output: Path = Field(..., description="folder: prompts.jsonl, heldout.jsonl, sft.jsonl, tokenizer/")
    digits: int = Field(2, ge=1, le=9, description="most digits of each operand")
    min_digits: int = Field(1, ge=1, le=9, description="fewest digits of each operand")
    n_train: int = Field(2000, ge=1, description="training problems (the GRPO prompts)")
    n_heldout: int = Field(200, ge=1, description="held-out problems, disjoint from training by (a, b)")
    n_sft: int = Field(1000, ge=0, description="SFT pairs, the first n_sft training problems")
    seed: int = Field(0, description="the same seed writes byte-identical files")
    overwrite: bool = Field(False, description="replace an existing output folder")


class ArithReportConfig(Section):
    before: Path = Field(..., description="`lmforge eval` output folder of the model before (the SFT model)")
    after: Path = Field(..., description="`lmforge eval` output folder of the model after (the GRPO model)")
    task: str = Field("heldout", description="name of the generation task in both reports")
    output: Path = Field(..., description="folder to write accuracy.json in")
    overwrite: bool = Field(False, description="replace an existing output folder")


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        ArithConfig,
        "data arith",
        "Write a verifiable addition task ('12+34=' -> '46') for GRPO: training prompts and held-out "
        "prompts with an `answer` field, SFT prompt/completion pairs, and a byte-level tokenizer "
        "(one token per character). Deterministic by seed.",
        "lmforge data arith output=runs/demo-rl/data digits=2 n_train=2000 n_heldout=200 n_sft=1000",
    )
    task = make_task(
        seed=cfg.seed,
        digits=cfg.digits,
        min_digits=cfg.min_digits,
        n_train=cfg.n_train,
        n_heldout=cfg.n_heldout,
        n_sft=cfg.n_sft,
    )
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        counts = write_task(task, stage)
        write_manifest(stage / TOKENIZER, stage="data arith")  # the tokenizer loader checks its own folder
        save_config(cfg, stage, "data arith")
        write_manifest(stage, stage="data arith", extra={"counts": counts})
    Console(stderr=True).print(
        f"data arith: {counts['train']} training, {counts['heldout']} held-out, {counts['sft']} SFT "
        f"problems ({cfg.min_digits}..{cfg.digits}-digit operands) -> {cfg.output}"
    )
    return 0


def report_main(argv: list[str]) -> int:
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


__all__ = ["ArithConfig", "ArithReportConfig", "main", "report_main"]
