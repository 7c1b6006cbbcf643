"""`lmforge tokenizer train`: train a byte-level BPE tokenizer on curated documents (a data stage).

    lmforge tokenizer train -c configs/demo/tokenizer.yaml input=runs/demo/curated output=runs/demo/tokenizer

Training holds out a stable hash-selected share of documents (the same hash as `tokenize`'s validation
split) and reports bytes per token on them: the number that decides whether a vocabulary size pays off.
The tokenizer itself (train, load, save, chat template) is the library `lmforge.tokenizer`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import Field
from rich.console import Console

from lmforge.config import (
    ConfigFsPath,
    EncryptionConfig,
    Section,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.curated import curated_shards, iter_curated
from lmforge.data.manifest import ensure_verified, write_manifest
from lmforge.data.shards import doc_fraction
from lmforge.errors import DataError
from lmforge.io import atomic_write_json, check_output, staged_output
from lmforge.tokenizer import (
    CHATML_TEMPLATE,
    ChatTemplate,
    SpecialTokensConfig,
    bytes_per_token,
    train_tokenizer,
)

REPORT = "report.json"


class TokenizerTrainConfig(Section):
    input: ConfigFsPath = Field(description="curated documents directory (output of `lmforge prepare`)")
    output: ConfigFsPath = Field(description="tokenizer directory to write (a Hugging Face tokenizer folder)")
    vocab_size: int = Field(
        8192,
        ge=300,
        le=1 << 20,
        description="tokens in the vocabulary, special tokens and 256 bytes included",
    )
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    special_tokens: SpecialTokensConfig = Field(default_factory=SpecialTokensConfig)
    chat_template: ChatTemplate = Field(
        CHATML_TEMPLATE, description="Jinja chat template (transformers' dialect)"
    )
    model_max_length: int = Field(2048, ge=1, description="context length recorded for transformers")
    heldout_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="share of documents held out of training to measure bytes/token"
    )
    seed: int = Field(0, description="salt of the stable document hash that picks held-out documents")
    max_train_bytes: int = Field(0, ge=0, description="train on at most this many UTF-8 bytes (0 = all)")
    overwrite: bool = Field(False, description="replace an existing output directory")
    verify_input: bool = Field(True, description="check the input's SHA-256 manifest first")
    encryption: EncryptionConfig = encryption_field()


CONFIG = TokenizerTrainConfig


class DocSplitter:
    """Feeds training documents to the trainer and keeps held-out ones aside.

    The last training document is held back one step, so that when hashing picked no held-out document
    (tiny corpora) it becomes the held-out one instead: >= 2 documents always give a measurable report.
    """

    def __init__(self, docs: Iterable[dict[str, Any]], fraction: float, seed: int, max_bytes: int) -> None:
        self.docs, self.fraction, self.seed, self.max_bytes = docs, fraction, seed, max_bytes
        self.heldout: list[str] = []
        self.train_docs = self.train_bytes = self.total_docs = 0

    def __iter__(self) -> Iterator[str]:
        pending: str | None = None
        for i, doc in enumerate(self.docs):
            self.total_docs += 1
            text = doc["text"]
            if doc_fraction(str(doc.get("id", i)), self.seed) < self.fraction:
                self.heldout.append(text)
                continue
            if self.max_bytes and self.train_bytes >= self.max_bytes:
                continue
            if pending is not None:
                yield pending
            pending = text
            self.train_docs += 1
            self.train_bytes += len(text.encode("utf-8"))
        if pending is not None:
            if not self.heldout and self.fraction > 0 and self.total_docs >= 2:
                self.heldout.append(pending)
                self.train_docs -= 1
                self.train_bytes -= len(pending.encode("utf-8"))
            else:
                yield pending


def run(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Train, measure, save; returns the report."""
    console = Console(stderr=True)
    check_output(cfg.output, cfg.overwrite)
    ensure_verified(cfg.input, skip=not cfg.verify_input)
    curated_shards(cfg.input)  # a clear DataError when the directory holds no documents
    splitter = DocSplitter(iter_curated(cfg.input), cfg.heldout_fraction, cfg.seed, cfg.max_train_bytes)
    t0 = time.perf_counter()
    tok = train_tokenizer(
        splitter,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        chat_template=cfg.chat_template,
        model_max_length=cfg.model_max_length,
        show_progress=sys.stderr.isatty(),
    )
    train_seconds = time.perf_counter() - t0
    if splitter.train_docs == 0:
        raise DataError(
            f"{cfg.input}: no documents left to train on (heldout_fraction={cfg.heldout_fraction})"
        )
    hb, ht = bytes_per_token(tok, splitter.heldout)
    report = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.vocab_size,
        "special_tokens": tok.special_tokens,
        "train_seconds": round(train_seconds, 3),
        "train_documents": splitter.train_docs,
        "train_bytes": splitter.train_bytes,
        "train_mb_per_s": round(splitter.train_bytes / 1e6 / max(train_seconds, 1e-9), 3),
        "heldout_documents": len(splitter.heldout),
        "heldout_bytes": hb,
        "heldout_tokens": ht,
        "bytes_per_token": round(hb / ht, 4) if ht else None,
        "utf8_bytes_per_token": 1.0,  # the baseline: a byte-level model without merges
    }
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        tok.save(stage)
        atomic_write_json(stage / REPORT, report)
        save_config(cfg, stage, "tokenizer train")
        write_manifest(stage, stage="tokenizer train")
    bpt = report["bytes_per_token"]
    console.print(
        f"tokenizer: {tok.vocab_size} tokens, trained on {splitter.train_docs:,} docs "
        f"({splitter.train_bytes / 1e6:.1f} MB) in {train_seconds:.1f} s; held-out {len(splitter.heldout):,} docs "
        f"({hb / 1e6:.2f} MB): {bpt if bpt is not None else 'n/a'} bytes/token (UTF-8 bytes: 1.0) -> {cfg.output}"
    )
    return report


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        CONFIG,
        "tokenizer train",
        "Train a byte-level BPE tokenizer on curated documents and save it as a Hugging Face tokenizer folder "
        "(tokenizer.json, tokenizer_config.json with the chat template), with a bytes-per-token report "
        "on held-out documents.",
        "lmforge tokenizer train -c configs/demo/tokenizer.yaml input=runs/demo/curated output=runs/demo/tokenizer",
    )
    run(cfg)
    return 0


__all__ = ["CONFIG", "DocSplitter", "TokenizerTrainConfig", "main", "run"]
