"""`lmforge prepare`: raw text in, curated documents out (clean, filter, mask PII, decontaminate, deduplicate).

    lmforge prepare -c configs/demo/prepare.yaml output=runs/demo/curated
    lmforge prepare input='[data/*.jsonl.zst, notes/]' output=runs/my/curated workers=2 dedup.threshold=0.85

Pipeline (one document at a time, in input order):
  ingest -> normalise -> strip boilerplate -> quality rules -> wordlist -> PII mask -> decontaminate
         -> exact dedup -> MinHash LSH near dedup [-> poisoning scan: scan.enabled, data/scan_stage.py]
         -> curated shards + report.json/.md (+ scan.json/.md) + manifest.json

Input is read as a stream and cut into batches (`batch_docs` / `batch_mb`); `workers` processes clean the
batches and compute the MinHash signatures, and the parent takes results back in batch order, so 1 and N
workers write byte-identical shards and reports. Each finished batch is saved under `<output>.partial/work/`
(an atomic rename is its done marker): after a crash, the rerun reuses finished batches when the config and
the input files are unchanged, and starts over otherwise. `<output>` only appears, manifest included, at the
very end. Dedup needs every signature (num_perm x 4 bytes per document) in memory, nothing else does.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import zstandard
from pydantic import Field

from lmforge import __version__, crypt
from lmforge.config import ConfigPath, EncryptionConfig, Section, encryption_field, parse_command, save_config
from lmforge.data.clean import (
    RULES,
    Boilerplate,
    CleanConfig,
    FilterConfig,
    QualityConfig,
    Wordlist,
    normalize,
    quality_reason,
)
from lmforge.data.curated import PATTERN, CuratedWriter
from lmforge.data.decontam import Decontaminator
from lmforge.data.dedup import DedupConfig, Deduper, exact_key, signature
from lmforge.data.hfdata import source_signature
from lmforge.data.ingest import IngestConfig, InputFile, RawDoc, Skipped, expand_inputs, iter_documents
from lmforge.data.manifest import write_manifest
from lmforge.data.pii import PII_KINDS, check_kinds, mask_pii
from lmforge.data.report import Sampler, render_markdown, truncate
from lmforge.data.scan_stage import DROP_RULE, PrepareScanConfig, StageScan, scan_documents
from lmforge.data.scan_stage import render_markdown as scan_markdown
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_text, staged_output
from lmforge.progress import Progress

STAGE = "prepare"
WORK = "work"
_LISTED_SKIPS = 200  # skipped files/lines listed one by one in the report (all are counted)


class PiiConfig(Section):
    enabled: bool = Field(True, description="mask PII with typed placeholders such as <EMAIL>")
    kinds: list[str] | None = Field(
        None, description="PII kinds to mask (default: all of lmforge.data.pii.PII_KINDS)"
    )


class DecontamConfig(Section):
    eval_files: list[ConfigPath] = Field(
        [], description="evaluation files (.txt/.jsonl/.json) to decontaminate against"
    )
    ngram: int = Field(13, ge=1, description="shared word n-gram length that counts as contamination")
    mode: Literal["drop", "flag"] = Field(
        "drop", description='drop contaminated documents, or keep them with "contaminated": true'
    )
    min_hits: int = Field(1, ge=1, description="shared n-grams needed to call a document contaminated")


class ReportConfig(Section):
    sample_size: int = Field(
        20, ge=0, description="kept and dropped documents sampled (each) for manual review"
    )
    sample_chars: int = Field(600, ge=0, description="characters shown per sampled document")
    clusters: int = Field(20, ge=0, description="largest duplicate clusters listed with their members")


class PrepareConfig(Section):
    input: ConfigPath | list[ConfigPath] = Field(
        description="files, directories, globs, or built-in corpora demo:shakespeare / demo:python-stdlib"
    )
    output: ConfigPath = Field(
        description="output directory (written as <output>.partial, renamed when complete)"
    )
    overwrite: bool = Field(False, description="replace an existing finished output")
    resume: bool = Field(
        True, description="reuse finished batches of a crashed run with the same config and inputs"
    )
    workers: int = Field(1, ge=1, le=256, description="worker processes (output is identical for any value)")
    seed: int = Field(0, description="seed of the report's random samples")
    shard_mb: float = Field(64.0, gt=0, description="uncompressed MB of JSON lines per output shard")
    batch_docs: int = Field(
        256, ge=1, description="documents per work batch (unit of parallelism and resume)"
    )
    batch_mb: float = Field(1.0, gt=0, description="a batch also closes at this many MB of text")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    scan: PrepareScanConfig = Field(default_factory=PrepareScanConfig)
    encryption: EncryptionConfig = encryption_field()


CONFIG = PrepareConfig
ALL_RULES = (*RULES, "wordlist", "contaminated", "exact_duplicate", "near_duplicate")


# ---------------------------------------------------------------- per-document work (runs in workers)


class Processor:
    """Everything done to one document before dedup; built once per worker process."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.boilerplate = Boilerplate(cfg.clean)
        self.wordlist = Wordlist(cfg.filter)
        self.pii_kinds: tuple[str, ...] | None = None
        if cfg.pii.enabled:
            self.pii_kinds = check_kinds(cfg.pii.kinds)
        self.decontam: Decontaminator | None = None
        if cfg.decontam.eval_files:
            self.decontam = Decontaminator([Path(p) for p in cfg.decontam.eval_files], n=cfg.decontam.ngram)

    def one(self, i: int, doc_id: str, raw: str, source: str) -> dict[str, Any]:
        cfg = self.cfg
        rec: dict[str, Any] = {"i": i, "id": doc_id, "source": source, "bytes": len(raw.encode("utf-8"))}
        text = normalize(raw, cfg.clean.unicode)
        text, rec["boiler"] = self.boilerplate(text)
        reason = quality_reason(text, cfg.quality)
        if reason is None and self.wordlist.rejects(text):
            reason = "wordlist"
        if self.pii_kinds is not None and (reason is None or cfg.report.sample_size > 0):
            # A document dropped here is still sampled into the report: masked like a kept one, but its
            # PII is not counted (the counts are of what the curated output held).
            text, counts = mask_pii(text, self.pii_kinds)
            if reason is None:
                rec["pii"] = {k: v for k, v in counts.items() if v}
        if reason is None and self.decontam is not None:
            hits = int(self.decontam.hits(text))
            if hits >= cfg.decontam.min_hits:
                rec["contam"] = hits
                if cfg.decontam.mode == "drop":
                    reason = "contaminated"
        if reason is not None:
            rec["status"] = reason
            rec["text"] = truncate(text, cfg.report.sample_chars)
            return rec
        rec["status"] = "kept"
        rec["text"] = text
        rec["key"] = exact_key(text)
        rec["sig"] = signature(text, cfg.dedup) if cfg.dedup.near else []
        return rec

    def batch(self, docs: list[tuple[int, str, str, str]]) -> list[dict[str, Any]]:
        return [self.one(*d) for d in docs]


_WORKER: Processor | None = None


def _init_worker(cfg_json: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = Processor(PrepareConfig.model_validate(cfg_json))


def _work(docs: list[tuple[int, str, str, str]]) -> list[dict[str, Any]]:
    assert _WORKER is not None
    return _WORKER.batch(docs)


# ---------------------------------------------------------------- bookkeeping (parent process)


def _dump_batch(records: list[dict[str, Any]]) -> bytes:
    lines = b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True).encode() + b"\n" for r in records)
    return zstandard.ZstdCompressor(level=3).compress(lines)


def _load_batch(path: Path) -> list[dict[str, Any]]:
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(crypt.read_bytes(path))).read()
    return [json.loads(line) for line in data.splitlines()]


def _fingerprint(cfg: PrepareConfig, files: list[InputFile]) -> str:
    """What a finished batch depends on: the config (less output/run options) and the input files."""
    conf = cfg.model_dump(mode="json", exclude={"output", "overwrite", "resume", "workers"})
    stats: list[list[Any]] = []
    for f in files:
        if f.hf:
            stats.append([f.source, source_signature(f.source)])
            continue
        st = f.path.stat()
        stats.append([f.source, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": __version__, "config": conf, "files": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Tally:
    """Counts, samples and the dedup index, fed with batch results in batch order."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.docs_in = 0
        self.bytes_in = 0
        self.dropped: Counter[str] = Counter()
        self.skips: Counter[str] = Counter()
        self.skipped: list[dict[str, str]] = []
        self.bad_lines = 0
        self.boiler_docs = 0
        self.boiler_chars = 0
        self.pii: Counter[str] = Counter()
        self.pii_docs = 0
        self.contam_docs = 0
        self.contam_hits = 0
        self.deduper = Deduper(cfg.dedup)
        self.sample_kept = Sampler(cfg.report.sample_size, cfg.seed)
        self.sample_dropped = Sampler(cfg.report.sample_size, cfg.seed)
        self.pending_docs = 0  # documents ingested but not yet absorbed (progress)

    def skip(self, s: Skipped) -> None:
        self.skips[s.reason] += 1
        if s.reason == "bad_line":
            self.bad_lines += 1
        if len(self.skipped) < _LISTED_SKIPS:
            self.skipped.append({"where": s.where, "reason": s.reason, "detail": s.detail})

    def absorb(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.docs_in += 1
            self.bytes_in += r["bytes"]
            if r["boiler"]:
                self.boiler_docs += 1
                self.boiler_chars += r["boiler"]
            if r.get("pii"):
                self.pii_docs += 1
                self.pii.update(r["pii"])
            if "contam" in r:
                self.contam_docs += 1
                self.contam_hits += r["contam"]
            if r["status"] == "kept":
                self.deduper.add(r["i"], r["key"], r["sig"])
            else:
                self.dropped[r["status"]] += 1
                self.sample_dropped.offer(
                    r["id"], {"id": r["id"], "source": r["source"], "reason": r["status"], "text": r["text"]}
                )


def _batches(
    items: Iterator[RawDoc | Skipped], tally: Tally, max_docs: int, max_bytes: float
) -> Iterator[list[tuple[int, str, str, str]]]:
    batch: list[tuple[int, str, str, str]] = []
    size = 0
    i = 0
    for item in items:
        if isinstance(item, Skipped):
            tally.skip(item)
            continue
        batch.append((i, item.id, item.text, item.source))
        i += 1
        size += len(item.text)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(
    cfg: PrepareConfig, batches: Iterator[list[tuple[int, str, str, str]]], work: Path
) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """(records, reused) per batch in batch order: loaded from `work/` when finished before, else computed."""

    def done_path(k: int) -> Path:
        return work / f"batch-{k:06d}.jsonl.zst"

    if cfg.workers == 1:
        proc = Processor(cfg)
        for k, batch in enumerate(batches):
            path = done_path(k)
            if path.is_file():
                yield _load_batch(path), True
                continue
            records = proc.batch(batch)
            crypt.write_bytes(path, _dump_batch(records))
            yield records, False
        return
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    window: deque[tuple[int, Any]] = deque()
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.model_dump(mode="json"),)) as pool:

        def drain_one() -> tuple[list[dict[str, Any]], bool]:
            k, pending = window.popleft()
            if isinstance(pending, Path):
                return _load_batch(pending), True
            records = pending.get()
            crypt.write_bytes(done_path(k), _dump_batch(records))
            return records, False

        for k, batch in enumerate(batches):
            path = done_path(k)
            window.append((k, path if path.is_file() else pool.apply_async(_work, (batch,))))
            while len(window) > 2 * cfg.workers:  # bounded: at most 2 batches per worker in flight
                yield drain_one()
        while window:
            yield drain_one()


def _check(cfg: PrepareConfig) -> None:
    """Fail before any work on config problems that would otherwise fail inside a worker."""
    Processor(cfg)  # compiles regexes, reads the wordlist, checks PII kinds and eval files
    if cfg.dedup.near and cfg.dedup.bands is not None and cfg.dedup.bands > cfg.dedup.num_perm:
        raise ConfigError(f"dedup.bands={cfg.dedup.bands} exceeds dedup.num_perm={cfg.dedup.num_perm}")
    ref = cfg.scan.reference
    if cfg.scan.enabled and ref and not Path(ref).expanduser().exists():
        raise ConfigError(
            f"scan.reference: {ref} does not exist (a model folder for the perplexity detector)"
        )


def run(cfg: PrepareConfig, *, crash_after_batches: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run prepare and return report.json's content. `crash_after_batches` injects a failure (tests)."""
    t0 = time.perf_counter()
    _check(cfg)
    files = expand_inputs(cfg.input, cfg.ingest.extensions)
    out = Path(cfg.output)
    with staged_output(out, overwrite=cfg.overwrite, resume=cfg.resume) as stage:
        work = _open_work(stage, _fingerprint(cfg, files))
        tally, reused = _process(cfg, files, work, crash_after_batches)
        if tally.docs_in == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(tally.skips.items())) or "no documents"
            raise DataError(f"input {cfg.input!r}: no usable documents ({reasons})")
        dedup = tally.deduper.run()
        scanned = scan_documents(cfg.scan, _final_docs(work, dedup)) if cfg.scan.enabled else None
        docs_out, bytes_out, ids = _write_curated(cfg, stage, work, tally, dedup, scanned)
        report = _report(cfg, tally, dedup, docs_out, bytes_out, len(files), ids)
        if scanned is not None:
            report["scan"] = {k: v for k, v in scanned.report.items() if k not in ("patterns", "examples")}
            # The scan report quotes documents too (PII-masked): sealed like them when encrypting.
            crypt.write_json(stage / "scan.json", scanned.report)
            crypt.write_text(stage / "scan.md", scan_markdown(scanned.report))
        # The report quotes sample documents: sealed like them when encrypting.
        crypt.write_json(stage / "report.json", report)
        crypt.write_text(stage / "report.md", render_markdown(report))
        save_config(cfg, stage, STAGE)
        shutil.rmtree(work)
        write_manifest(stage, stage=STAGE)
    if not quiet:
        _say_done(out, tally, report, docs_out, bytes_out, reused, time.perf_counter() - t0)
    return report


def _open_work(stage: Path, fingerprint: str) -> Path:
    """`work/` of the staging directory, emptied unless it was written with the same `fingerprint`."""
    work = stage / WORK
    stamp = work / "fingerprint"
    if not (stamp.is_file() and stamp.read_text() == fingerprint):
        for p in stage.iterdir():  # a different config or input: nothing in here is reusable
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        work.mkdir()
        atomic_write_text(stamp, fingerprint)
    return work


def _process(
    cfg: PrepareConfig, files: list[InputFile], work: Path, crash_after_batches: int | None
) -> tuple[Tally, int]:
    """Every document through the per-document pipeline, in batch order: (tally, batches reused)."""
    plain = all(not f.hf and not f.path.name.endswith((".gz", ".zst", ".parquet")) for f in files)
    total = sum(f.path.stat().st_size for f in files) if plain else None
    tally = Tally(cfg)
    reused = 0
    batches = _batches(iter_documents(files, cfg.ingest), tally, cfg.batch_docs, cfg.batch_mb * 1e6)
    docs = 0
    with Progress("prepare", total, "bytes") as bar:  # input bytes; no total for compressed inputs
        for n, (records, was_done) in enumerate(_results(cfg, batches, work), 1):
            tally.absorb(records)
            reused += was_done
            docs += len(records)
            rate = docs / max(time.perf_counter() - bar.started, 1e-9)
            bar.advance(sum(r["bytes"] for r in records), note=f"{docs} docs, {rate:,.1f} docs/s")
            if crash_after_batches is not None and n >= crash_after_batches:
                raise RuntimeError(f"injected crash after {n} batches")
    return tally, reused


def _final_docs(work: Path, dedup: Any) -> Iterator[dict[str, Any]]:
    """The documents that survive dedup, in order: what the scan stage sees."""
    for path in sorted(work.glob("batch-*.jsonl.zst")):
        yield from (
            r for r in _load_batch(path) if r["status"] == "kept" and r["i"] not in dedup.duplicate_of
        )


def _write_curated(
    cfg: PrepareConfig, stage: Path, work: Path, tally: Tally, dedup: Any, scanned: StageScan | None
) -> tuple[int, int, dict[int, str]]:
    """The curated shards: kept documents less duplicates, which are counted and sampled as dropped.
    Returns (documents written, text bytes written, ids of the documents the report's clusters list)."""
    for p in stage.glob(PATTERN):  # shards of an interrupted final pass
        p.unlink()
    bytes_out = 0
    listed = {m for c in dedup.clusters[: cfg.report.clusters] for m in c}  # ids needed by the report
    ids: dict[int, str] = {}
    chars = cfg.report.sample_chars
    with CuratedWriter(stage, shard_bytes=int(cfg.shard_mb * 1e6)) as writer:
        for path in sorted(work.glob("batch-*.jsonl.zst")):
            for r in _load_batch(path):
                if r["status"] != "kept":
                    continue
                i = r["i"]
                if i in listed:
                    ids[i] = r["id"]
                sample = {"id": r["id"], "source": r["source"], "text": truncate(r["text"], chars)}
                if i in dedup.duplicate_of:
                    kind = dedup.kind[i]
                    tally.dropped[kind] += 1
                    tally.sample_dropped.offer(r["id"], {**sample, "reason": kind})
                    continue
                flags = scanned.flags.get(i) if scanned is not None else None
                if flags and cfg.scan.drop:
                    tally.dropped[DROP_RULE] += 1
                    tally.sample_dropped.offer(r["id"], {**sample, "reason": DROP_RULE})
                    continue
                doc: dict[str, Any] = {"id": r["id"], "text": r["text"], "source": r["source"]}
                if r.get("contam"):
                    doc["contaminated"] = True
                if flags:
                    doc["scan"] = flags
                writer.write(doc)
                bytes_out += len(r["text"].encode("utf-8"))
                tally.sample_kept.offer(r["id"], sample)
    return writer.documents, bytes_out, ids


def _say_done(
    out: Path, tally: Tally, report: dict[str, Any], docs_out: int, bytes_out: int, reused: int, dt: float
) -> None:
    drops = ", ".join(f"{k} {v}" for k, v in report["documents"]["dropped"].items() if v) or "none"
    print(
        f"prepare: {tally.docs_in:,} docs in -> {docs_out:,} out "
        f"({tally.bytes_in / 1e6:.2f} MB -> {bytes_out / 1e6:.2f} MB); dropped: {drops}; "
        f"{sum(tally.skips.values())} inputs skipped; {reused} batches resumed\n"
        f"prepare: wrote {out} in {dt:.1f} s ({tally.docs_in / dt:,.1f} docs/s, {tally.bytes_in / dt / 1e6:.2f} MB/s)"
    )
    if docs_out == 0:
        print("prepare: warning: every document was dropped; see report.md", file=sys.stderr)


def _report(
    cfg: PrepareConfig,
    tally: Tally,
    dedup: Any,
    docs_out: int,
    bytes_out: int,
    n_files: int,
    ids: dict[int, str],
) -> dict[str, Any]:
    rules = []
    n = tally.docs_in
    all_rules = (*ALL_RULES, DROP_RULE) if cfg.scan.enabled and cfg.scan.drop else ALL_RULES
    for rule in all_rules:
        d = tally.dropped.get(rule, 0)
        rules.append({"rule": rule, "in": n, "dropped": d, "out": n - d})
        n -= d
    assert n == docs_out, (n, docs_out)
    clusters = []
    for members in dedup.clusters[: cfg.report.clusters]:
        clusters.append(
            {
                "size": len(members),
                "kept": {"id": ids[members[0]]},
                "dropped": [
                    {"id": ids[m], "kind": dedup.kind[m], "similarity": dedup.similarity[m]}
                    for m in members[1:]
                ],
            }
        )
    kinds = cfg.pii.kinds or list(PII_KINDS)
    return {
        "stage": STAGE,
        "inputs": {
            "spec": cfg.input,
            "files": n_files,
            "files_skipped": {k: v for k, v in sorted(tally.skips.items()) if k != "bad_line"},
            "files_skipped_total": sum(v for k, v in tally.skips.items() if k != "bad_line"),
            "bad_lines": tally.bad_lines,
            "skipped": tally.skipped,
        },
        "documents": {
            "in": tally.docs_in,
            "out": docs_out,
            "dropped": {rule: tally.dropped.get(rule, 0) for rule in all_rules},
        },
        "rules": rules,
        "bytes": {"in": tally.bytes_in, "out": bytes_out},
        "boilerplate": {"docs": tally.boiler_docs, "chars_removed": tally.boiler_chars},
        "dedup": {
            "exact_duplicates": tally.dropped.get("exact_duplicate", 0),
            "near_duplicates": tally.dropped.get("near_duplicate", 0),
            "clusters": len(dedup.clusters),
            "candidate_pairs": dedup.candidate_pairs,
            "threshold": cfg.dedup.threshold,
            "num_perm": cfg.dedup.num_perm,
            "bands": dedup.bands,
            "rows": dedup.rows,
            "shingle": cfg.dedup.shingle,
            "ngram": cfg.dedup.ngram,
            "fold_spelling": cfg.dedup.fold_spelling,
            "largest_clusters": clusters,
        },
        "pii": {
            "enabled": cfg.pii.enabled,
            "counts": {k: tally.pii.get(k, 0) for k in kinds} if cfg.pii.enabled else {},
            "docs": tally.pii_docs,
        },
        "decontam": {
            "enabled": bool(cfg.decontam.eval_files),
            "eval_files": cfg.decontam.eval_files,
            "ngram": cfg.decontam.ngram,
            "mode": cfg.decontam.mode,
            "docs_hit": tally.contam_docs,
            "ngrams_hit": tally.contam_hits,
        },
        "sample": {"kept": tally.sample_kept.items(), "dropped": tally.sample_dropped.items()},
    }


DESCRIPTION = (
    "Ingest raw text (txt/md/jsonl(.gz/.zst)/parquet files, directories, globs, Hugging Face datasets: "
    "save_to_disk folders, .arrow files, hf:ORG/NAME[:config][@revision]; demo:shakespeare, "
    "demo:python-stdlib), normalise, strip boilerplate, apply quality rules, mask PII, decontaminate against "
    "eval files, drop exact and near duplicates (MinHash LSH), optionally scan for planted backdoors "
    "(scan.enabled=true, scan.drop=true), and write curated shards with report.json, "
    "report.md and manifest.json. The same input and config give byte-identical output for any `workers`."
)
EXAMPLE = "lmforge prepare -c configs/demo/prepare.yaml output=runs/demo/curated workers=2"


def main(argv: list[str]) -> int:
    cfg = parse_command(argv, CONFIG, STAGE, DESCRIPTION, EXAMPLE)
    run(cfg)
    return 0


__all__ = ["CONFIG", "PrepareConfig", "Processor", "main", "run"]
