"""`lmforge eval`: score a model on perplexity, generation and multiple-choice tasks; write report.json + .md.

    lmforge eval -c eval.yaml model=runs/demo/pretrain output=runs/demo/eval

    model: runs/demo/pretrain
    output: runs/demo/eval
    tasks:
      - {type: perplexity, data: runs/demo/tokens, split: val}          # token shards
      - {type: perplexity, name: notes, data: [notes.txt], stride: 128}  # raw text, sliding window
      - {type: generation, data: qa.jsonl, prompt_field: question, reference_field: answer, max_tokens: 32}
      - {type: multiple_choice, name: arc-mini, data: arc.jsonl}         # {"query", "choices", "gold"}

    lmforge eval reward_model=runs/rm/model data=responses.jsonl output=runs/rm/scores

With `reward_model` (an `lmforge align reward` model/ folder) and `data` ({"prompt", "response"} JSONL)
instead of `model` and `tasks`, eval scores each response: report.json holds n, mean, std, min, max and
every row's score in file order.

The output directory appears atomically and holds report.json, report.md, config.yaml and manifest.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from rich.console import Console

from lmforge.config import (
    ConfigPath,
    ConfigRef,
    EncryptionConfig,
    Section,
    capped,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.hfdata import HFDataConfig
from lmforge.data.manifest import ensure_verified, write_manifest
from lmforge.device import pick_device
from lmforge.errors import DataError
from lmforge.eval import perplexity, tasks
from lmforge.eval.reward_score import score_responses
from lmforge.infer.engine import Engine
from lmforge.io import atomic_write_json, atomic_write_text, check_output, staged_output
from lmforge.model.hub import pinned
from lmforge.model.reward import load_reward_model
from lmforge.model.source import load_model
from lmforge.progress import Progress

COMMAND = "eval"


class PerplexityTask(Section):
    type: Literal["perplexity"]
    name: str | None = Field(None, description="name in the report (default: the data path)")
    data: ConfigPath | list[ConfigPath] = Field(
        ..., description="a tokens directory (`lmforge tokenize`) or text file(s)"
    )
    split: str = Field("val", description="split of a tokens directory")
    seq_len: int | None = Field(None, ge=2, description="window length (null = the model's max_seq_len)")
    stride: int | None = Field(
        None, ge=1, description="window step (null: seq_len for token shards, seq_len/2 for text files)"
    )
    max_tokens: int | None = Field(None, ge=1, description="score at most this many tokens of a tokens split")


class GenerationTask(Section):
    type: Literal["generation"]
    name: str | None = Field(None, description="name in the report (default: the file name)")
    data: ConfigPath = Field(..., description="JSONL file, one example per line, or a Hugging Face dataset")
    prompt_field: str = Field("prompt", description="field holding the prompt")
    reference_field: str = Field("reference", description="field holding the reference (string or list)")
    max_tokens: int = Field(64, ge=1, description="tokens to generate per example")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="stop strings")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    limit: int | None = Field(None, ge=1, description="use only the first N examples")
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset input: split, columns, streaming"
    )


class MultipleChoiceTask(Section):
    type: Literal["multiple_choice"]
    name: str | None = Field(None, description="name in the report (default: the file name)")
    data: ConfigPath = Field(
        ...,
        description="JSONL or Hugging Face dataset: a context field (query/ctx/question/goal), choices, gold",
    )
    context_field: str | None = Field(None, description="context field (null = first of query, ctx, ...)")
    choices_field: str = Field("choices", description="field with the list of choices")
    gold_field: str = Field("gold", description="field with the index of the right choice")
    target_delimiter: str = Field(" ", description="put between the context and each choice (lm-eval's)")
    limit: int | None = Field(None, ge=1, description="use only the first N examples")
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset input: split, columns, streaming"
    )


Task = Annotated[PerplexityTask | GenerationTask | MultipleChoiceTask, Field(discriminator="type")]


class EvalConfig(Section):
    model: ConfigRef | None = Field(
        None, description="HF folder, hub id ORG/NAME[@REV], lmforge run / model folder, or checkpoint"
    )
    output: ConfigPath = Field(..., description="report directory (report.json, report.md)")
    tasks: list[Task] = Field(default_factory=list, description="tasks to run (see docs/eval.md)")
    reward_model: ConfigPath | None = Field(
        None, description="instead of model + tasks: a reward model folder (`lmforge align reward` model/)"
    )
    data: ConfigPath | None = Field(
        None, description='with reward_model: JSONL of {"prompt", "response"} to score'
    )
    prompt_field: str = Field("prompt", description="with reward_model: field holding the prompt")
    response_field: str = Field("response", description="with reward_model: field holding the response")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to run: auto = cuda when present, else cpu; mps = Apple Silicon"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    seed: int = Field(0, description="seed for sampled generation tasks")
    verify_input: bool = Field(True, description="check a tokens directory against its manifest")
    overwrite: bool = Field(False, description="replace an existing report directory")
    encryption: EncryptionConfig = encryption_field()

    @model_validator(mode="after")
    def _one_mode(self) -> EvalConfig:
        if self.reward_model is not None:
            if self.data is None or self.model is not None or self.tasks:
                raise ValueError("reward_model: give data (a responses JSONL), and no model or tasks")
        elif self.model is None or not self.tasks:
            raise ValueError("give model and tasks (or reward_model and data to score responses)")
        return self


CONFIG = EvalConfig
DESCRIPTION = (
    "Evaluate a model: perplexity and bits per byte on token shards or text files, generation tasks "
    "(BLEU, exact match) and multiple-choice tasks (acc, acc_norm) from local JSONL; or score a JSONL "
    "of responses with a reward model (reward_model=DIR data=FILE)."
)
EXAMPLE = "lmforge eval -c eval.yaml model=runs/demo/pretrain output=runs/demo/eval"


def _task_name(task: Any) -> str:
    if task.name:
        return str(task.name)
    data = task.data if isinstance(task.data, str) else ",".join(task.data)
    return Path(data).stem if task.type != "perplexity" else data


UNITS = {"perplexity": "tokens", "multiple_choice": "choices", "generation": "answers"}


def run_task(
    task: Any, model: Any, tok: Any, engine: Any, cfg: EvalConfig, progress: Progress | None = None
) -> dict[str, Any]:

    max_len = model.cfg.max_seq_len
    if task.type == "perplexity":
        seq_len = (
            capped(f"tasks[{_task_name(task)}].seq_len", task.seq_len, max_len) if task.seq_len else max_len
        )
        files = [task.data] if isinstance(task.data, str) else task.data
        if len(files) == 1 and Path(files[0]).is_dir():
            if cfg.verify_input:
                ensure_verified(Path(files[0]))
            return perplexity.shards_perplexity(
                model,
                files[0],
                split=task.split,
                seq_len=seq_len,
                stride=task.stride,
                batch_size=cfg.batch_size,
                max_tokens=task.max_tokens,
                verify=cfg.verify_input,
                progress=progress,
            )
        return perplexity.text_perplexity(
            model,
            tok,
            files,
            seq_len=seq_len,
            stride=task.stride or max(1, seq_len // 2),
            batch_size=cfg.batch_size,
            progress=progress,
        )
    if task.type == "generation":
        return tasks.generation(
            engine,
            task.data,
            prompt_field=task.prompt_field,
            reference_field=task.reference_field,
            max_tokens=task.max_tokens,
            stop=task.stop,
            temperature=task.temperature,
            seed=cfg.seed,
            limit=task.limit,
            progress=progress,
            hf=task.hf,
        )
    return tasks.multiple_choice(
        model,
        tok,
        task.data,
        choices_field=task.choices_field,
        gold_field=task.gold_field,
        context_field=task.context_field,
        target_delimiter=task.target_delimiter,
        batch_size=cfg.batch_size,
        limit=task.limit,
        progress=progress,
        hf=task.hf,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return "n/a" if v is None else str(v)


def report_markdown(report: dict[str, Any]) -> str:
    if "reward_model" in report:
        r = report["scores"]
        return (
            f"# Reward-model scores of `{report['data']}` by `{report['reward_model']}`\n\n| n | mean | std | "
            f"min | max |\n|---|---|---|---|---|\n| {r['n']} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} "
            f"| {r['max']:.4f} |\n"
        )
    lines = [f"# Evaluation of `{report['model']}`", ""]
    metrics = ("loss", "perplexity", "bits_per_byte", "tokens", "acc", "acc_norm", "bleu", "exact_match", "n")
    lines += ["| task | type | " + " | ".join(metrics) + " | seconds |", "|" + "---|" * (len(metrics) + 3)]
    for t in report["tasks"]:
        row = [_fmt(t["metrics"].get(m)) if m in t["metrics"] else "" for m in metrics]
        lines.append(
            f"| {t['name']} | {t['type']} | " + " | ".join(row) + f" | {t['metrics']['seconds']:.1f} |"
        )
    for t in report["tasks"]:
        examples = t["metrics"].get("examples")
        if examples:
            lines += ["", f"## {t['name']}: first outputs", ""]
            for ex in examples:
                lines.append(
                    f"- prompt `{ex['prompt']!r}` -> `{ex['output']!r}` (reference `{ex['references'][0]!r}`)"
                )
    return "\n".join(lines) + "\n"


def run(cfg: EvalConfig) -> dict[str, Any]:

    console = Console(stderr=True)
    if cfg.model is not None:  # a hub id's commit, saved in config.yaml
        cfg = cfg.model_copy(update={"model": pinned(cfg.model)})
    check_output(Path(cfg.output), cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.reward_model is not None:
        report = _score(cfg, console)
        _write(cfg, report)
        return report
    names = [_task_name(t) for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise DataError(f"tasks: two tasks share a name ({names}); give them distinct `name`s")
    assert cfg.model is not None
    model, tok = load_model(cfg.model, device=pick_device(cfg.device))
    engine = Engine(model, tok, max_batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    results = []
    for name, task in zip(names, cfg.tasks, strict=True):
        console.print(f"eval: {name} ({task.type}) ...")
        with Progress(f"eval {name}", None, UNITS[task.type]) as bar:
            metrics = run_task(task, model, tok, engine, cfg, bar)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("examples",))
        console.print(f"  {shown}")
        results.append({"name": name, "type": task.type, "metrics": metrics})
    report = {"model": cfg.model, "tasks": results, "seconds": time.perf_counter() - t0}
    _write(cfg, report)
    console.print(f"eval: report -> {cfg.output}/report.md")
    return report


def _score(cfg: EvalConfig, console: Console) -> dict[str, Any]:
    """The reward-model mode: every response of `data` scored."""
    assert cfg.reward_model is not None and cfg.data is not None
    model, tok = load_reward_model(cfg.reward_model, device=pick_device(cfg.device))
    t0 = time.perf_counter()
    scores = score_responses(
        model,
        tok,
        cfg.data,
        prompt_field=cfg.prompt_field,
        response_field=cfg.response_field,
        batch_size=cfg.batch_size,
    )
    console.print(f"eval: {scores['n']} responses, mean score {scores['mean']:.4f}, std {scores['std']:.4f}")
    elapsed = time.perf_counter() - t0
    return {"reward_model": cfg.reward_model, "data": cfg.data, "scores": scores, "seconds": elapsed}


def _write(cfg: EvalConfig, report: dict[str, Any]) -> None:
    with staged_output(Path(cfg.output), overwrite=cfg.overwrite, resume=False) as stage:
        atomic_write_json(stage / "report.json", report)
        atomic_write_text(stage / "report.md", report_markdown(report))
        save_config(cfg, stage, COMMAND)
        write_manifest(stage, stage=COMMAND)


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    run(cfg)
    return 0


__all__ = ["CONFIG", "EvalConfig", "GenerationTask", "MultipleChoiceTask", "PerplexityTask", "main", "run"]
