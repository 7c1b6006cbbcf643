"""The `lmforge` command: one entry point, a table of commands, each implemented in its own module.

    lmforge <command> [-c config.yaml] [key.sub=value ...]
    lmforge <command> --help          # every config key with its meaning and default

Commands are imported only when run, so `lmforge --help` is instant and a stage's heavy imports
(torch, transformers) cost nothing to the others.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import time
from collections.abc import Callable

from lmforge import __version__, audit
from lmforge.errors import LmforgeError, report

# command -> ("module:function", one-line help). The function takes argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "lmforge.pipeline.run:main",
        "run a pipeline file's stages, each only when its config or inputs changed",
    ),
    "prepare": (
        "lmforge.data.prepare:main",
        "ingest, clean, deduplicate, mask PII and decontaminate raw text",
    ),
    "data verify": ("lmforge.data.verify:main", "check a stage's output against its SHA-256 manifest"),
    "data scan": (
        "lmforge.data.scan_run:main",
        "flag backdoor-like poisoning in documents, SFT and DPO data",
    ),
    "data feedback": (
        "lmforge.data.feedback:main",
        "turn the server's feedback log (ratings, comparisons) into preference pairs",
    ),
    "data arith": (
        "lmforge.data.arith_run:main",
        "write the addition task of the RL demo: prompts with answers, SFT pairs, a byte tokenizer",
    ),
    "data arith-report": (
        "lmforge.data.arith_report:main",
        "held-out accuracy before and after from two eval reports (the RL demo's result)",
    ),
    "tokenizer train": (
        "lmforge.data.tokenizer_train:main",
        "train a byte-level BPE tokenizer with a chat template",
    ),
    "tokenizer import": (
        "lmforge.data.tokenizer_import:main",
        "convert a SentencePiece .model or tiktoken rank file into a tokenizer folder",
    ),
    "tokenize": ("lmforge.data.tokenize:main", "turn curated documents into token shards"),
    "model info": ("lmforge.model.info:main", "parameters, shapes, FLOPs and memory of a model"),
    "model pull": (
        "lmforge.model.pull:main",
        "download a Hugging Face hub model (safetensors only) or find it in the cache",
    ),
    "pretrain": ("lmforge.train.pretrain:main", "train a model on token shards (CPU, GPU, torchrun)"),
    "generate": ("lmforge.infer.generate:main", "generate text from prompts (sampling, streaming)"),
    "watermark detect": (
        "lmforge.infer.watermark_detect:main",
        "z-score and p-value of the keyed green-list watermark in a text",
    ),
    "chat": ("lmforge.infer.chat:main", "chat with a model in the terminal through its chat template"),
    "eval": ("lmforge.eval.run:main", "perplexity, bits per byte, BLEU and multiple-choice tasks"),
    "serve": (
        "lmforge.serve.app:main",
        "OpenAI-compatible HTTP server with API keys, limits and a chat page",
    ),
    "finetune": ("lmforge.train.finetune:main", "supervised fine-tuning: full, LoRA or QLoRA"),
    "lora merge": ("lmforge.train.lora_merge:main", "fold a LoRA adapter into its base model"),
    "align dpo": ("lmforge.train.dpo:main", "direct preference optimisation on chosen/rejected pairs"),
    "align reward": (
        "lmforge.train.reward:main",
        "train a reward model (Bradley-Terry) on chosen/rejected pairs",
    ),
    "align grpo": ("lmforge.train.grpo:main", "group relative policy optimisation with reward functions"),
    "sweep": (
        "lmforge.sweep.run:main",
        "Optuna hyperparameter sweep over a training command's config keys, with pruning",
    ),
    "quantize": ("lmforge.quant.run:main", "weight-only int8, int4 (RTN/GPTQ) or NF4 with a quality report"),
    "export": ("lmforge.export.run:main", "export to an HF folder, GGUF or ONNX with a parity report"),
    "plan": (
        "lmforge.plan.run:main",
        "what fits on which hardware, how fast, at what cost; --probe proves it",
    ),
    "crypt keygen": ("lmforge.data.crypt_run:keygen_main", "write a new random 256-bit encryption key"),
    "crypt encrypt": ("lmforge.data.crypt_run:encrypt_main", "encrypt a folder's weights and data at rest"),
    "crypt decrypt": ("lmforge.data.crypt_run:decrypt_main", "decrypt a folder's encrypted files"),
    "crypt rotate": ("lmforge.data.crypt_run:rotate_main", "rewrap a folder's data keys under a new key"),
    "audit verify": ("lmforge.audit_cli:verify_main", "check the audit log's hash chain and signatures"),
    "audit lineage": ("lmforge.audit_cli:lineage_main", "the audited commands that produced a model"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS) + 2
    rows = "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items())
    return (
        f"lmforge {__version__}: build custom language models end to end.\n\n"
        "usage: lmforge <command> [-c config.yaml] [key=value ...]\n\n"
        f"commands:\n{rows}\n\n"
        "Run `lmforge <command> --help` for the command's config keys."
    )


def resolve(argv: list[str]) -> tuple[str, Callable[[list[str]], int], list[str]]:
    """Find the longest command name that prefixes argv: 'data verify' before 'data'."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            module, func = COMMANDS[name][0].split(":")
            return name, getattr(importlib.import_module(module), func), argv[n:]
    raise KeyError(argv[0] if argv else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    try:
        name, func, rest = resolve(argv)
    except KeyError:
        close = difflib.get_close_matches(" ".join(argv[:2]), COMMANDS, n=1) or difflib.get_close_matches(
            argv[0], COMMANDS, n=1
        )
        hint = f"; did you mean `lmforge {close[0]}`?" if close else ""
        print(f"error: unknown command {' '.join(argv[:2])!r}{hint} (see `lmforge --help`)", file=sys.stderr)
        return 2
    if name.startswith("audit "):  # reading the log does not write to it
        return _run(func, rest)
    started, code = time.perf_counter(), 1  # 1: an unexpected exception, whose traceback follows
    try:
        code = _run(func, rest)
    except SystemExit as e:  # --help, --print-config, argparse errors
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:  # one record per command in $LMFORGE_AUDIT_LOG (if set); never raises
        audit.record_command(name, rest, code, time.perf_counter() - started)
    return code


def _run(func: Callable[[list[str]], int], rest: list[str]) -> int:
    try:
        return int(func(rest) or 0)
    except LmforgeError as e:
        report(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a path that cannot exist: say so without a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
