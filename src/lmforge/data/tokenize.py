"""`lmforge tokenize`: curated documents -> token shards (train/val), parallel, resumable, deterministic.

    lmforge tokenize -c configs/demo/tokenize.yaml input=runs/demo/curated tokenizer=runs/demo/tokenizer \\
        output=runs/demo/tokens workers=2

How it works:
1. The main process reads the curated documents in order and cuts them into parts of ~`part_bytes` of
   text. Each document goes to validation when its stable id hash is below `val_fraction` (see
   `shards.doc_fraction`); if that picks none among >= 2 documents, the last document goes instead.
2. Worker processes tokenize parts independently into `<output>.partial/parts/part-NNNNN.{train,val}.bin`
   (every document followed by EOS) and then write `part-NNNNN.json`: the done marker. A rerun after a
   crash or Ctrl-C skips every part with a marker whose files have the recorded sizes.
3. Parts are concatenated in part order into `train-NNNNN.bin` / `val-NNNNN.bin` shards of at most
   `shard_tokens` tokens, so the output does not depend on the number of workers or on timing.
The format is described in `lmforge.data.shards`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from rich.console import Console

from lmforge import crypt
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
from lmforge.data.shards import (
    INDEX,
    SPLITS,
    TOKENIZER_DIR,
    VERSION,
    doc_fraction,
    dtype_for_vocab,
    shard_file,
)
from lmforge.errors import DataError
from lmforge.io import atomic_write_json, sha256_file, staged_output
from lmforge.progress import Progress
from lmforge.tokenizer import TOKENIZER_FILES, TOKENIZER_JSON, load_tokenizer

PARTS = "parts"
PLAN = "plan.json"
_COPY_CHUNK = 16 << 20


class TokenizeConfig(Section):
    input: ConfigFsPath = Field(description="curated documents directory (output of `lmforge prepare`)")
    tokenizer: ConfigFsPath = Field(description="tokenizer directory (output of `lmforge tokenizer train`)")
    output: ConfigFsPath = Field(description="token shards directory to write")
    val_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="share of documents for validation (by stable hash of the id)"
    )
    seed: int = Field(0, description="salt of the document hash that picks validation documents")
    workers: int = Field(1, ge=1, description="tokenizer processes (1 = in-process, multithreaded in Rust)")
    part_bytes: int = Field(
        2 << 20, ge=1, description="text per work unit; the unit of parallelism and of resume"
    )
    shard_tokens: int = Field(
        1 << 27, ge=1, description="tokens per output shard file (the last shard of a split may be smaller)"
    )
    parse_special_tokens: bool = Field(
        False,
        description="map special-token strings inside documents ('<|endoftext|>') to their ids; by default "
        "they stay ordinary text, so a document cannot inject an EOS",
    )
    resume: bool = Field(True, description="reuse finished parts of an interrupted run of the same inputs")
    overwrite: bool = Field(False, description="replace an existing output directory")
    verify_input: bool = Field(True, description="check the input and tokenizer SHA-256 manifests first")
    encryption: EncryptionConfig = encryption_field()


CONFIG = TokenizeConfig


@dataclass
class Part:
    index: int
    texts: list[str] = field(default_factory=list)
    is_val: list[bool] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class Totals:
    parts_done: int = 0
    parts_skipped: int = 0
    text_bytes: int = 0
    tokens: int = 0
    documents: int = 0


def _plan_parts(docs: Iterator[dict[str, Any]], cfg: TokenizeConfig) -> Iterator[Part]:
    """Cut documents into parts and assign splits. One part is held back so the last one can be fixed up."""
    part, pending = Part(0), None
    total = val = 0
    for i, doc in enumerate(docs):
        text = doc["text"]
        is_val = cfg.val_fraction > 0 and doc_fraction(str(doc.get("id", i)), cfg.seed) < cfg.val_fraction
        part.texts.append(text)
        part.is_val.append(is_val)
        part.nbytes += len(text.encode("utf-8"))
        total += 1
        val += is_val
        if part.nbytes >= cfg.part_bytes:
            if pending is not None:
                yield pending
            pending, part = part, Part(part.index + 1)
    if part.texts:
        if pending is not None:
            yield pending
        pending = part
    if pending is None:
        return
    if cfg.val_fraction > 0 and val == 0 and total >= 2:
        pending.is_val[-1] = True  # tiny corpus: hashing picked no validation document
    yield pending


# Worker side: one tokenizer per process, loaded once.
_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_dir: str, parse_special_tokens: bool, key_state: crypt.KeyState) -> None:
    # Parallelism comes from processes here; Rust threads on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    crypt.restore(key_state)  # spawned: the parent's encryption.key_file is not inherited
    _set_worker_tokenizer(load_tokenizer(tokenizer_dir), parse_special_tokens)


def _set_worker_tokenizer(tok: Any, parse_special_tokens: bool) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok if parse_special_tokens else tok.as_plain_text()


def _part_paths(parts_dir: Path, index: int) -> tuple[dict[str, Path], Path]:
    bins = {split: parts_dir / f"part-{index:05d}.{split}.bin" for split in SPLITS}
    return bins, parts_dir / f"part-{index:05d}.json"


def _tokenize_part(parts_dir: str, part: Part, dtype: str) -> dict[str, Any]:
    """Tokenize one part into its .bin files and write its done marker; returns the marker's content."""
    tok = _WORKER_TOKENIZER
    assert tok is not None, "worker not initialised"
    bins, marker = _part_paths(Path(parts_dir), part.index)
    eos = np.array([tok.eos_id], dtype=dtype)
    pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    stats: dict[str, dict[str, int]] = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}
    for text, is_val, ids in zip(part.texts, part.is_val, tok.encode_batch(part.texts), strict=True):
        split = "val" if is_val else "train"
        pieces[split] += [np.asarray(ids, dtype=dtype), eos]
        st = stats[split]
        st["tokens"] += len(ids) + 1
        st["documents"] += 1
        st["bytes"] += len(text.encode("utf-8"))
    for split, path in bins.items():
        tmp = path.with_name(path.name + ".tmp")
        arr = np.concatenate(pieces[split]) if pieces[split] else np.zeros(0, dtype=dtype)
        arr = arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False)
        if crypt.encrypting():  # the parts sit in the staging folder: no plaintext there either
            crypt.write_bytes(path, arr.tobytes(), encrypt=True)
            continue
        arr.tofile(tmp)
        os.replace(tmp, path)
    result = {"index": part.index, "splits": stats}
    atomic_write_json(marker, result)  # written last: its presence means the part is complete
    return result


def _finished_part(parts_dir: Path, index: int, itemsize: int) -> dict[str, Any] | None:
    """The marker of a complete part, or None when the part must be (re)done."""
    bins, marker = _part_paths(parts_dir, index)
    if not marker.is_file():
        return None
    try:
        result: dict[str, Any] = json.loads(marker.read_text("utf-8"))
        for split, path in bins.items():
            if not path.is_file() or crypt.plain_size(path) != result["splits"][split]["tokens"] * itemsize:
                return None
    except (ValueError, KeyError, TypeError):
        return None
    return result


class _ShardWriter:
    """Appends token bytes to `<split>-NNNNN.bin` files, rotating every `shard_tokens`, hashing as it goes
    (sealed when encrypting; then the recorded SHA-256 is the ciphertext's, checkable without the key)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, itemsize: int) -> None:
        self.directory, self.split, self.itemsize = directory, split, itemsize
        self.limit = shard_tokens * itemsize
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._raw: Any = None
        self._hash: Any = None
        self._written = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._raw.close()
            sealed = self._f is not self._raw
            sha = sha256_file(self.directory / self.shards[-1]["file"]) if sealed else self._hash.hexdigest()
            self.shards[-1].update(tokens=self._written // self.itemsize, sha256=sha)
            self._f = self._raw = None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self._f is None or self._written >= self.limit:
                self._close()
                name = shard_file(self.split, len(self.shards))
                self._raw = self._f = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close
                key = crypt.current_key()
                if crypt.encrypting() and key is not None:
                    self._f = crypt.EncryptedWriter(self._raw, key)
                self._hash, self._written = hashlib.sha256(), 0
                self.shards.append({"file": name})
            take = min(len(view), self.limit - self._written)
            self._f.write(view[:take])
            self._hash.update(view[:take])
            self._written += take
            view = view[take:]

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def _concatenate(
    stage: Path, markers: list[dict[str, Any]], cfg: TokenizeConfig, itemsize: int
) -> dict[str, Any]:
    parts_dir = stage / PARTS
    splits: dict[str, Any] = {}
    for split in SPLITS:
        writer = _ShardWriter(stage, split, cfg.shard_tokens, itemsize)
        totals = {"tokens": 0, "documents": 0, "bytes": 0}
        for m in markers:
            bins, _ = _part_paths(parts_dir, m["index"])
            for key in totals:
                totals[key] += m["splits"][split][key]
            with crypt.open_read(bins[split]) as f:
                while chunk := f.read(_COPY_CHUNK):
                    writer.write(chunk)
        splits[split] = {**totals, "shards": writer.close()}
    return splits


def _plan_key(cfg: TokenizeConfig, tokenizer_sha: str) -> dict[str, Any]:
    """What the parts depend on; a leftover staging dir with another key is discarded, not reused."""
    manifest = cfg.input / "manifest.json"
    return {
        "version": VERSION,
        "input_manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "tokenizer_sha256": tokenizer_sha,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "part_bytes": cfg.part_bytes,
        "parse_special_tokens": cfg.parse_special_tokens,
    }


def _read_plan(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def curated_documents(directory: Path) -> int | None:
    """Documents in a curated directory, from prepare's report.json (None without one): progress's total."""
    try:
        return int(json.loads((directory / "report.json").read_text("utf-8"))["documents"]["out"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _progress_line(t: Totals, elapsed: float) -> str:
    el = max(elapsed, 1e-9)
    return (
        f"{t.text_bytes / 1e6:,.1f} MB, {t.tokens:,} tokens, {t.documents:,} docs | "
        f"{t.text_bytes / 1e6 / el:,.2f} MB/s, {t.tokens / el:,.0f} tok/s"
    )


def run(cfg: TokenizeConfig, *, stop_after_parts: int | None = None) -> dict[str, Any]:
    """Tokenize; returns index.json's content plus run statistics under "run".

    `stop_after_parts` raises KeyboardInterrupt once that many parts were tokenized in this run, as a
    Ctrl-C would: the resume tests use it.
    """
    console = Console(stderr=True)
    ensure_verified(cfg.input, skip=not cfg.verify_input)
    ensure_verified(cfg.tokenizer, skip=not cfg.verify_input)
    curated_shards(cfg.input)
    tok = load_tokenizer(cfg.tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    itemsize = np.dtype(dtype).itemsize
    tokenizer_sha = sha256_file(cfg.tokenizer / TOKENIZER_JSON)
    t0 = time.perf_counter()
    totals = Totals()
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume) as stage:
        parts_dir = _parts_dir(stage, cfg, tokenizer_sha)
        markers = _tokenize_parts(cfg, tok, parts_dir, dtype, totals, t0, stop_after_parts)
        if totals.documents == 0:
            raise DataError(f"{cfg.input}: no documents to tokenize")
        ordered = [markers[i] for i in sorted(markers)]
        assert [m["index"] for m in ordered] == list(range(len(ordered))), "a part is missing"
        splits = _concatenate(stage, ordered, cfg, itemsize)
        shutil.rmtree(parts_dir)
        index = {
            "version": VERSION,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "tokenizer_sha256": tokenizer_sha,
            "splits": splits,
        }
        _write_output(stage, cfg, index)
    elapsed = time.perf_counter() - t0
    console.print(_summary(splits, dtype, totals, elapsed, len(ordered), cfg.output))
    run_stats = {"seconds": elapsed, "parts": len(ordered), "parts_skipped": totals.parts_skipped}
    return {**index, "run": run_stats}


def _parts_dir(stage: Path, cfg: TokenizeConfig, tokenizer_sha: str) -> Path:
    """The parts directory of the staged output, emptied unless it was made from these inputs and settings."""
    parts_dir = stage / PARTS
    key = _plan_key(cfg, tokenizer_sha)
    plan_file = parts_dir / PLAN
    if parts_dir.exists() and _read_plan(plan_file) != key:
        shutil.rmtree(parts_dir)  # made from other inputs or settings: not reusable
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, key)
    return parts_dir


def _worker_pool(cfg: TokenizeConfig) -> ProcessPoolExecutor | None:
    if cfg.workers <= 1:
        return None
    return ProcessPoolExecutor(
        cfg.workers,
        # spawn, not fork: forking a process whose Rust thread pool already ran can deadlock.
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(cfg.tokenizer), cfg.parse_special_tokens, crypt.state()),
    )


def _tokenize_parts(
    cfg: TokenizeConfig,
    tok: Any,
    parts_dir: Path,
    dtype: str,
    totals: Totals,
    t0: float,
    stop_after_parts: int | None,
) -> dict[int, dict[str, Any]]:
    """Tokenize every part not already finished in `parts_dir` (here or in worker processes), adding to
    `totals`; returns the done markers by part index."""
    itemsize = np.dtype(dtype).itemsize
    markers: dict[int, dict[str, Any]] = {}

    def record(m: dict[str, Any], skipped: bool) -> None:
        markers[m["index"]] = m
        for st in m["splits"].values():
            totals.text_bytes += st["bytes"]
            totals.tokens += st["tokens"]
            totals.documents += st["documents"]
        if skipped:
            totals.parts_skipped += 1
        else:
            totals.parts_done += 1
            if stop_after_parts is not None and totals.parts_done >= stop_after_parts:
                raise KeyboardInterrupt

    pool = _worker_pool(cfg)
    if pool is None:  # workers=1: tokenize here (Rust threads allowed)
        _set_worker_tokenizer(tok, cfg.parse_special_tokens)
    try:
        with Progress("tokenize", curated_documents(cfg.input), "docs") as progress:

            def show() -> None:
                progress.update(totals.documents, note=_progress_line(totals, time.perf_counter() - t0))

            inflight: set[Future[dict[str, Any]]] = set()

            def drain(block_until: int) -> None:
                nonlocal inflight
                while len(inflight) > block_until:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for fut in done:  # order is irrelevant: parts are keyed by index
                        record(fut.result(), skipped=False)
                    show()

            for part in _plan_parts(iter_curated(cfg.input), cfg):
                found = _finished_part(parts_dir, part.index, itemsize)
                if found is not None:
                    record(found, skipped=True)
                elif pool is None:
                    record(_tokenize_part(str(parts_dir), part, dtype), skipped=False)
                else:
                    inflight.add(pool.submit(_tokenize_part, str(parts_dir), part, dtype))
                    drain(2 * cfg.workers)  # bounded: parts in flight hold their text in memory
                show()
            drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return markers


def _write_output(stage: Path, cfg: TokenizeConfig, index: dict[str, Any]) -> None:
    """index.json, a copy of the tokenizer beside the shards, the config and the manifest."""
    atomic_write_json(stage / INDEX, index)
    (stage / TOKENIZER_DIR).mkdir(exist_ok=True)
    for name in (*TOKENIZER_FILES, "chat_template.jinja"):  # HF folders may lack some of these
        if (cfg.tokenizer / name).is_file():
            # tokenizer.json is sealed when encrypting; its small config files stay readable (metadata)
            copy = crypt.copy_file if name == TOKENIZER_JSON else shutil.copyfile
            copy(cfg.tokenizer / name, stage / TOKENIZER_DIR / name)
    save_config(cfg, stage, "tokenize")
    write_manifest(stage, stage="tokenize")


def _summary(
    splits: dict[str, Any], dtype: str, totals: Totals, elapsed: float, n_parts: int, output: Path
) -> str:
    tr, va = splits["train"], splits["val"]
    return (
        f"tokenize: {tr['tokens']:,} train tokens ({tr['documents']:,} docs), {va['tokens']:,} val tokens "
        f"({va['documents']:,} docs), {dtype}, {totals.text_bytes / 1e6:.1f} MB in {elapsed:.1f} s "
        f"({totals.text_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s, {totals.tokens / max(elapsed, 1e-9):,.0f} tok/s"
        f"; {totals.parts_skipped} of {n_parts} parts reused) -> {output}"
    )


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        CONFIG,
        "tokenize",
        "Tokenize curated documents into flat uint16/uint32 token shards with an EOS after every document, "
        "a train/validation split by document, and index.json with token counts and SHA-256 checksums. "
        "Parallel (workers=N) and resumable: rerun the same command after an interruption.",
        "lmforge tokenize -c configs/demo/tokenize.yaml input=runs/demo/curated tokenizer=runs/demo/tokenizer "
        "output=runs/demo/tokens",
    )
    run(cfg)
    return 0


__all__ = ["CONFIG", "TokenizeConfig", "main", "run"]
