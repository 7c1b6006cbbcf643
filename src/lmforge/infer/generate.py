"""`lmforge generate`: complete prompts given as arguments or in a file, streaming when there is one prompt.

    lmforge generate model=runs/demo/pretrain prompt="To be, or not to be"
    lmforge generate model=runs/demo/pretrain prompts='["KING:", "QUEEN:"]' sampling.temperature=0.7 sampling.seed=1
    lmforge generate -c gen.yaml prompt_file=prompts.txt output=completions.jsonl   # one prompt per line

A prompt file is plain text (one prompt per line; `\\n` in a line stands for a newline) or JSONL with a
"prompt" field. Results go to stdout, and to `output` as JSONL (prompt, text, finish_reason, token counts).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lmforge.config import ConfigPath, ConfigRef, EncryptionConfig, Section, encryption_field, parse_command
from lmforge.device import pick_device
from lmforge.errors import ConfigError, DataError
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.prompting import encode_prompt, stop_at_turn_end
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.watermark import Watermark, WatermarkConfig
from lmforge.io import atomic_write_text, iter_jsonl, read_lines
from lmforge.model.source import load_model

COMMAND = "generate"


class GenerateConfig(Section):
    model: ConfigRef = Field(
        ..., description="HF folder, hub id ORG/NAME[@REV], lmforge run / model folder, or checkpoint"
    )
    prompt: str | None = Field(None, description="one prompt")
    prompts: list[str] = Field(default_factory=list, description="several prompts (generated as a batch)")
    prompt_file: ConfigPath | None = Field(
        None, description="text file (one prompt per line) or JSONL with 'prompt'"
    )
    chat: bool = Field(
        False, description="wrap each prompt as a user message in the tokenizer's chat template"
    )
    add_bos: bool = Field(False, description="prepend the tokenizer's BOS token to each prompt")
    sampling: SamplingParams = SamplingParams()
    watermark: WatermarkConfig = WatermarkConfig()
    batch_size: int = Field(8, ge=1, description="prompts per batch")
    max_seq_len: int | None = Field(None, ge=1, description="cap on prompt + output tokens (null = model's)")
    stream: bool = Field(True, description="print tokens as they come when there is a single prompt")
    output: ConfigPath | None = Field(None, description="also write results to this JSONL file")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to run: auto = cuda when present, else cpu; mps = Apple Silicon"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    compile: bool = Field(False, description="torch.compile the forward (worth it on GPU, slow first call)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    encryption: EncryptionConfig = encryption_field()


CONFIG = GenerateConfig
DESCRIPTION = (
    "Generate text from prompts with the lmforge engine: batched, KV-cached, with temperature, top-k, top-p, "
    "min-p, repetition penalty, stop strings/tokens and seeds; optionally watermarked (docs/watermark.md)."
)
EXAMPLE = 'lmforge generate model=runs/demo/pretrain prompt="To be, or not" sampling.max_tokens=64'


def read_prompt_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        out = []
        for n, rec in iter_jsonl(path):
            if not isinstance(rec.get("prompt"), str):
                raise DataError(f"{path}:{n}: expected an object with a string 'prompt' field")
            out.append(rec["prompt"])
        return out
    return [
        line.replace("\\n", "\n") for _, line in read_lines(path, "prompt_file", comments=False, strip=False)
    ]


def collect_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = ([cfg.prompt] if cfg.prompt is not None else []) + list(cfg.prompts)
    if cfg.prompt_file:
        prompts += read_prompt_file(Path(cfg.prompt_file))
    if not prompts:
        raise ConfigError("no prompts: set prompt=..., prompts=[...] or prompt_file=...")
    return prompts


def run(cfg: GenerateConfig, out: Any = None) -> list[dict[str, Any]]:

    out = out or sys.stdout
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts = collect_prompts(cfg)
    hook = Watermark.from_config(cfg.watermark) if cfg.watermark.enabled else None  # key checked first
    model, tok = load_model(cfg.model, device=pick_device(cfg.device), dtype=getattr(torch, cfg.dtype))
    engine = Engine(
        model, tok, max_batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, compile=cfg.compile
    )
    params = cfg.sampling
    if cfg.chat:  # the reply ends at the template's end-of-turn token, as in `lmforge chat`
        params = stop_at_turn_end(tok, params)
    requests = [
        GenerationRequest(encode_prompt(tok, p, cfg.chat, cfg.add_bos), params, logits_hook=hook)
        for p in prompts
    ]
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    if len(requests) == 1 and cfg.stream:
        print(prompts[0], end="", file=out, flush=True)
        parts: list[str] = []
        ids: list[int] = []
        reason = "length"
        for ev in engine.stream(requests[0]):
            print(ev.text, end="", file=out, flush=True)
            parts.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
            reason = ev.finish_reason or reason
        print(file=out)
        completions = [(ids, "".join(parts), reason)]
    else:
        completions = [(c.token_ids, c.text, c.finish_reason) for c in engine.generate(requests)]
        for i, (p, (_, text, _)) in enumerate(zip(prompts, completions, strict=True)):
            if len(prompts) > 1:
                print(f"--- [{i}]", file=out)
            print(p + text, file=out)
    seconds = time.perf_counter() - t0
    for p, req, (ids, text, reason) in zip(prompts, requests, completions, strict=True):
        results.append(
            {
                "prompt": p,
                "text": text,
                "finish_reason": reason,
                "prompt_tokens": len(req.prompt_ids),
                "completion_tokens": len(ids),
            }
        )
    n = sum(r["completion_tokens"] for r in results)
    print(f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tok/s)", file=sys.stderr)
    if cfg.output:
        atomic_write_text(
            Path(cfg.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        )
    return results


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    run(cfg)
    return 0


__all__ = ["CONFIG", "GenerateConfig", "collect_prompts", "main", "run"]
