"""Eval-set decontamination: find training documents that share word n-grams (default 13) with eval files.

    from lmforge.data.decontam import Decontaminator
    dc = Decontaminator([Path("evals/hellaswag.jsonl"), Path("evals/qa.txt")])   # n=13
    if dc.hits(doc_text):  # number of distinct eval n-grams the document contains
        ...drop or flag the document...

Text is normalised the same way on both sides: lower-cased word tokens (`\\w+`, so punctuation and
whitespace differences do not matter). Every n-gram becomes a 64-bit hash (a polynomial over per-token
BLAKE2b hashes, computed for all windows at once with numpy, so a document costs O(n * words) vector
work); the eval side is a Python set of them (about 100 bytes per distinct n-gram).

Eval files (the suffix decides):
  .txt    one item per non-empty line
  .jsonl  one JSON value per line; every string inside it (object values, list items, nested) is an item
  .json   one JSON value (usually a list of objects); every string inside it is an item
Each string is its own item, so n-grams never join the end of a question to the start of its answer.

Items shorter than n words: an item with `min_words <= k < n` words is matched as a whole, i.e. its one
k-gram is stored and documents are also scanned for k-grams of those lengths. Items with fewer than
`min_words` words (default 8, or n when n is smaller: "Paris", "True", "4") would match ordinary text
and are skipped; they are counted in `skipped_items`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError

_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication mod 2**64 is a bijection
SUFFIXES = (".txt", ".jsonl", ".json")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation and whitespace are separators, never part of a token."""
    return _WORD.findall(text.lower())


class _TokenHasher:
    """Stable 64-bit token hashes (BLAKE2b), cached because vocabularies repeat heavily."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def _new(self, tok: str) -> int:
        h = int.from_bytes(hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little")
        if len(self._cache) < 2_000_000:  # bound memory on adversarial vocabularies
            self._cache[tok] = h
        return h

    def __call__(self, tokens: list[str]) -> np.ndarray:
        get, new = self._cache.get, self._new
        return np.array([h if (h := get(t)) is not None else new(t) for t in tokens], dtype=np.uint64)


def rolling_hashes(token_hashes: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """Hash of every window of `n` tokens: sum(h_i * B**(n-1-i)) mod 2**64, one vector op per position
    in the window (uint64 arithmetic wraps mod 2**64), salted with n so different lengths never mix."""
    t = np.asarray(token_hashes, dtype=np.uint64)
    windows = len(t) - n + 1
    if windows <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(windows, dtype=np.uint64)
    for j in range(n):
        h = h * _BASE + t[j : j + windows]
    return h ^ np.uint64(n)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_eval_items(path: Path) -> Iterator[str]:
    """The text items of one eval file (see the module docstring for the formats)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"eval file {path}: unsupported suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"eval file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"eval file {path} cannot be read as UTF-8 text: {e}") from None
    if suffix == ".txt":
        yield from (line for line in text.splitlines() if line.strip())
    elif suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield from _strings(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"eval file {path} line {lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            yield from _strings(json.loads(text))
        except json.JSONDecodeError as e:
            raise DataError(f"eval file {path}: invalid JSON at line {e.lineno} ({e.msg})") from None


class Decontaminator:
    """The n-gram hashes of a set of eval files; `hits(text)` counts the distinct ones a text contains."""

    def __init__(self, eval_files: Sequence[Path], n: int = 13, *, min_words: int = 8) -> None:
        if n < 1 or min_words < 1:
            raise DataError(
                f"decontamination needs n >= 1 and min_words >= 1 (got n={n}, min_words={min_words})"
            )
        self.n = n
        self.min_words = min(min_words, n)  # with n < min_words, every item of n+ words is usable
        self.eval_files = [Path(p) for p in eval_files]
        self.num_items = 0
        self.skipped_items = 0
        self._hash = _TokenHasher()
        self._ngrams: set[int] = set()
        self._short_lengths: set[int] = set()  # lengths k < n of whole short items that were stored
        self._bitmap: np.ndarray | None = None  # see _lookup
        self._mask = np.uint64(0)
        self._bitmap_for = -1
        for path in self.eval_files:
            for item in read_eval_items(path):
                self._add(item)

    def _add(self, item: str) -> None:
        tokens = words(item)
        if len(tokens) < self.min_words:
            self.skipped_items += 1
            return
        self.num_items += 1
        k = min(len(tokens), self.n)
        if k < self.n:
            self._short_lengths.add(k)
        self._ngrams.update(rolling_hashes(self._hash(tokens), k).tolist())

    @property
    def num_ngrams(self) -> int:
        """Distinct hashed eval n-grams (plus whole short items)."""
        return len(self._ngrams)

    def _lookup(self) -> tuple[np.ndarray, np.uint64]:
        """A bitmap over the low hash bits (8+ bits per eval n-gram): most windows are rejected by one
        vectorised index, and only the few that hit a set bit are looked up in the exact set."""
        if self._bitmap is None or self._bitmap_for != len(self._ngrams):
            bits = 1 << max(16, min(28, (8 * len(self._ngrams)).bit_length()))
            mask = np.uint64(bits - 1)
            bitmap = np.zeros(bits, dtype=bool)
            bitmap[
                (np.fromiter(self._ngrams, dtype=np.uint64, count=len(self._ngrams)) & mask).astype(np.intp)
            ] = True
            self._bitmap, self._mask, self._bitmap_for = bitmap, mask, len(self._ngrams)
        return self._bitmap, self._mask

    def hits(self, text: str) -> int:
        """Number of distinct eval n-grams (or whole short items) that occur in `text`."""
        if not self._ngrams:
            return 0
        bitmap, mask = self._lookup()
        t = self._hash(words(text))
        wanted = {self.n, *self._short_lengths}
        found: set[int] = set()
        # Grow every window by one token per step (h: all windows of length k), testing the wanted k.
        h = t
        for k in range(1, self.n + 1):
            if k > 1:
                h = h[:-1] * _BASE + t[k - 1 :]
            if len(h) == 0:
                break
            if k in wanted:
                salted = h ^ np.uint64(k)
                maybe = salted[bitmap[(salted & mask).astype(np.intp)]]
                if len(maybe):
                    found |= self._ngrams.intersection(maybe.tolist())
        return len(found)

    def contaminated(self, text: str, min_hits: int = 1) -> bool:
        return self.hits(text) >= min_hits
