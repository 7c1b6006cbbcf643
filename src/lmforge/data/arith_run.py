"""`lmforge data arith`: write the addition task of the RL demo (the library is data/arith.py).

lmforge data arith output=runs/demo-rl/data digits=2 seed=0
"""

from __future__ import annotations

from pydantic import Field
from rich.console import Console

from lmforge.config import ConfigFsPath, Section, parse_command, save_config
from lmforge.data.arith import TOKENIZER, make_task, write_task
from lmforge.data.manifest import write_manifest
from lmforge.io import staged_output


class ArithConfig(Section):
    output: ConfigFsPath = Field(
        ..., description="folder: prompts.jsonl, heldout.jsonl, sft.jsonl, tokenizer/"
    )
    digits: int = Field(2, ge=1, le=9, description="most digits of each operand")
    min_digits: int = Field(1, ge=1, le=9, description="fewest digits of each operand")
    n_train: int = Field(2000, ge=1, description="training problems (the GRPO prompts)")
    n_heldout: int = Field(200, ge=1, description="held-out problems, disjoint from training by (a, b)")
    n_sft: int = Field(1000, ge=0, description="SFT pairs, the first n_sft training problems")
    seed: int = Field(0, description="the same seed writes byte-identical files")
    overwrite: bool = Field(False, description="replace an existing output folder")


CONFIG = ArithConfig


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


__all__ = ["CONFIG", "ArithConfig", "main"]
