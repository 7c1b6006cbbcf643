"""`lmforge watermark detect`: is a text watermarked with our key? (the library is infer/watermark.py)

    lmforge watermark detect "Some text to test" model=runs/demo/pretrain key_file=wm.key
    lmforge watermark detect completions.jsonl tokenizer=runs/demo/tokenizer --json   # key from the env

TEXT_OR_FILE is a file when such a file exists (a .jsonl file is scored per record's "text", as
`lmforge generate output=...` writes it), else the text itself. Prints z, p-value, green fraction, tokens
scored and the verdict for each text; `--json` prints one JSON object per text instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.config import ConfigPath, ConfigRef, Section, parse_command
from lmforge.errors import ConfigError, DataError
from lmforge.infer.watermark import KEY_ENV, Watermark, read_key
from lmforge.io import iter_jsonl
from lmforge.model.source import find_tokenizer
from lmforge.tokenizer import Tokenizer, load_tokenizer

COMMAND = "watermark detect"


class DetectConfig(Section):
    input: ConfigRef | None = Field(
        None, description="the text, or a file of it (also the first positional argument)"
    )
    model: ConfigRef | None = Field(
        None, description="model folder, run or checkpoint whose tokenizer to use"
    )
    tokenizer: ConfigRef | None = Field(None, description="tokenizer folder (instead of model)")
    key_file: ConfigPath | None = Field(None, description=f"file holding the secret key (null = ${KEY_ENV})")
    gamma: float = Field(0.25, gt=0, lt=1, description="green fraction the text was generated with")
    z_threshold: float = Field(
        4.0, gt=0, description="verdict 'watermarked' at z >= this (4.0: one-sided p ~ 3e-5)"
    )


CONFIG = DetectConfig
DESCRIPTION = (
    "Score a text for the keyed green-list watermark of `lmforge generate watermark.enabled=true`: "
    "one-proportion z-test over distinct token bigrams. Usage: lmforge watermark detect TEXT_OR_FILE "
    "[key=value ...] [--json]."
)
EXAMPLE = "lmforge watermark detect completions.jsonl model=runs/demo/pretrain key_file=wm.key --json"


def split_argv(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """(positional TEXT_OR_FILE, --json, the rest for the config parser)."""
    positional: str | None = None
    as_json = False
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--json":
            as_json = True
        elif a in ("-c", "--config"):
            rest += [a, next(it, "")]
        elif positional is None and not a.startswith("-") and "=" not in a:
            positional = a
        else:
            rest.append(a)
    return positional, as_json, rest


def tokenizer_of(cfg: DetectConfig) -> Tokenizer:
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if cfg.model is None:
        raise ConfigError("no tokenizer: set model=FOLDER or tokenizer=FOLDER")
    p = Path(cfg.model)
    # A model / HF folder, a run (model/ inside), or a checkpoint (runs/x/checkpoints/step-N).
    return find_tokenizer([p, p / "model", p.parent, p.parent.parent / "model", p.parent.parent], p)


def texts_of(source: str) -> list[tuple[str, str]]:
    """(label, text) pairs: the records of a .jsonl file, a whole text file, or the argument itself."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a text too long for a file name, or with a NUL byte
        is_file = False
    if not is_file:
        return [("text", source)]
    if path.suffix == ".jsonl":
        out = []
        for n, rec in iter_jsonl(path):
            if not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
            out.append((f"{path}:{n}", rec["text"]))
        return out
    try:
        return [(str(path), path.read_text("utf-8"))]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def report_line(label: str, d: dict[str, Any]) -> str:
    return (
        f"{label}: {d['verdict']} (z={d['z']:.2f}, p={d['p_value']:.2e}, green {d['green']}/{d['scored']}"
        f" = {d['green_fraction']:.3f}, gamma {d['gamma']})"
    )


def main(argv: list[str]) -> int:
    positional, as_json, rest = split_argv(argv)
    cfg = parse_command(rest, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    source = positional if positional is not None else cfg.input
    if source is None:
        raise ConfigError("nothing to score: give TEXT_OR_FILE (or input=...)")
    wm = Watermark(read_key(cfg.key_file, "key_file"), cfg.gamma)
    tok = tokenizer_of(cfg)
    for label, text in texts_of(source):
        det = wm.detect(tok.encode(text))
        d = {"input": label, **det.as_dict()}
        d["verdict"] = "watermarked" if det.detected(cfg.z_threshold) else "not watermarked"
        print(json.dumps(d) if as_json else report_line(label, d), file=sys.stdout)
    return 0


__all__ = ["CONFIG", "DetectConfig", "main", "split_argv", "texts_of", "tokenizer_of"]
