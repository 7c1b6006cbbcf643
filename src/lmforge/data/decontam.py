"""Eval-set decontamination: find training documents that share word n-grams (default 13) with eval files.

    from lmforge.data.decontam import Decontaminator
    dc = Decontaminator([Path("evals/hellaswag.jsonl"), Path("evals/qa.txt")])   # n=13
    if dc.hits(doc_text):  # number of distinct eval n-grams the document contains
        ...drop or flag the document...

Text is normalised the same way on both sides: lower-cased word tokens (`\\w+`, so punctuation and
whitespace differences do not matter). Every n-gram becomes a 64-bit hash (a polynomial over per-token
BLAKE2b hashes, rolled along the text, so a document costs O(words)); the eval side is a set of them.

Eval files (the suffix decides):
  .txt    one item per non-empty line
  .jsonl  one JSON value per line; every string inside it (object values, list items, nested) is an item
  .json   one JSON value (usually a list of objects); every string inside it is an item
Each string is its own item, so n-grams never join the end of a question to the start of its answer.

Items shorter than n words: an item with `min_words <= k < n` words is matched as a whole, i.e. its one
k-gram is stored and documents are also scanned for k-grams of those lengths. Items with fewer than
`min_words` words (default 8: "Paris", "True", "4") would match ordinary text and are skipped; they are
counted in `skipped_items`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import DataError

_WORD = re.compile(r"\w+")
_MASK = (1 << 64) - 1
_BASE = 0x100000001B3  # FNV-64 prime: odd, so multiplication mod 2**64 is a bijection
SUFFIXES = (".txt", ".jsonl", ".json")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation and whitespace are separators, never part of a token."""
    return _WORD.findall(text.lower())


class _TokenHasher:
    """Stable 64-bit token hashes (BLAKE2b), cached because vocabularies repeat heavily."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: list[str]) -> list[int]:
        cache = self._cache
        out = []
        for tok in tokens:
            h = cache.get(tok)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little")
                if len(cache) < 2_000_000:  # bound memory on adversarial vocabularies
                    cache[tok] = h
            out.append(h)
        return out


def rolling_hashes(token_hashes: list[int], n: int) -> Iterator[int]:
    """Hash of every window of `n` tokens: sum(h_i * B**(n-1-i)) mod 2**64, updated in O(1) per step."""
    if len(token_hashes) < n:
        return
    top = pow(_BASE, n - 1, 1 << 64)
    h = 0
    for t in token_hashes[:n]:
        h = (h * _BASE + t) & _MASK
    yield h ^ n  # salt with the length so whole short items and n-grams use different hash values
    for i in range(n, len(token_hashes)):
        h = ((h - token_hashes[i - n] * top) * _BASE + token_hashes[i]) & _MASK
        yield h ^ n


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
        if n < 1 or not 1 <= min_words <= n:
            raise DataError(
                f"decontamination needs n >= 1 and 1 <= min_words <= n (got n={n}, min_words={min_words})"
            )
        self.n = n
        self.min_words = min_words
        self.eval_files = [Path(p) for p in eval_files]
        self.num_items = 0
        self.skipped_items = 0
        self._hash = _TokenHasher()
        self._ngrams: set[int] = set()
        self._short_lengths: set[int] = set()  # lengths k < n of whole short items that were stored
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
        self._ngrams.update(rolling_hashes(self._hash(tokens), k))

    @property
    def num_ngrams(self) -> int:
        """Distinct hashed eval n-grams (plus whole short items)."""
        return len(self._ngrams)

    def hits(self, text: str) -> int:
        """Number of distinct eval n-grams (or whole short items) that occur in `text`."""
        if not self._ngrams:
            return 0
        hashes = self._hash(words(text))
        found: set[int] = set()
        for k in (self.n, *sorted(self._short_lengths)):
            found.update(h for h in rolling_hashes(hashes, k) if h in self._ngrams)
        return len(found)

    def contaminated(self, text: str, min_hits: int = 1) -> bool:
        return self.hits(text) >= min_hits
