"""Exact and near-duplicate detection for `lmforge prepare`: normalised-text hashes and MinHash LSH.

    from lmforge.data.dedup import DedupConfig, Deduper, exact_key, signature
    cfg = DedupConfig(threshold=0.8)
    d = Deduper(cfg)
    for i, text in enumerate(texts):
        d.add(i, exact_key(text), signature(text, cfg))   # in a fixed document order
    result = d.run()   # result.duplicate_of[i] -> index of the kept document, result.clusters

Exact duplicates: BLAKE2b of the text lower-cased with whitespace collapsed; the first occurrence stays.
Near duplicates: MinHash (rensa `RMinHash`) over word or character n-gram shingles, LSH banding (b bands of
r rows, chosen so a pair at `threshold` becomes a candidate with probability >= 0.95) for candidate pairs, each
candidate pair verified by its estimated Jaccard (share of equal signature slots) >= threshold; clusters are
the connected components (union-find) and each keeps its first document in input order.

`fold_spelling` maps early-modern spellings onto modern ones in the dedup key only (v->u, j->i, y->i,
doubled letters single, final e dropped), so `vpon`/`upon`, `selfe`/`self`, `haue`/`have` shingle alike.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field
from rensa import RMinHash

from lmforge.config import Section

_WORD = re.compile(r"\w+")
_DOUBLE = re.compile(r"(.)\1+")
_FOLD = str.maketrans({"v": "u", "j": "i", "y": "i"})
_WS = re.compile(r"\s+")
# Buckets bigger than this are compared against their first member only (star), not all pairs, so one
# band shared by thousands of boilerplate-like documents cannot make candidate generation quadratic.
_MAX_ALL_PAIRS = 64


class DedupConfig(Section):
    exact: bool = Field(
        True, description="drop documents whose normalised text (lower-case, spaces collapsed) repeats"
    )
    near: bool = Field(True, description="drop near duplicates found by MinHash LSH")
    threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Jaccard similarity of shingle sets above which two documents are duplicates",
    )
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (more = more exact, slower)")
    shingle: Literal["word", "char"] = Field(
        "word", description="shingles are word n-grams or character n-grams"
    )
    ngram: int = Field(5, ge=1, le=64, description="shingle size in words or characters")
    fold_spelling: bool = Field(
        False, description="fold early-modern spelling variants in the dedup key only"
    )
    bands: int | None = Field(
        None, ge=1, description="LSH bands (rows = num_perm // bands); default: optimal for `threshold`"
    )
    seed: int = Field(1, description="MinHash seed (part of the output: change it and clusters may change)")


def exact_key(text: str) -> str:
    return hashlib.blake2b(_WS.sub(" ", text.lower()).strip().encode("utf-8"), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=1 << 18)  # vocabularies repeat heavily: 10x faster shingling
def _fold(word: str) -> str:
    word = _DOUBLE.sub(r"\1", word.translate(_FOLD))
    return word[:-1] if len(word) > 2 and word.endswith("e") else word


def shingles(text: str, cfg: DedupConfig) -> list[str]:
    words = _WORD.findall(text.lower())
    if cfg.fold_spelling:
        words = [_fold(w) for w in words]
    n = cfg.ngram
    if cfg.shingle == "char":
        s = " ".join(words)
        return [s[i : i + n] for i in range(max(1, len(s) - n + 1))] if s else []
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def signature(text: str, cfg: DedupConfig) -> list[int]:
    """MinHash signature (num_perm uint32 values) of the document's shingle set."""
    m = RMinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    m.update(shingles(text, cfg))
    return [int(v) for v in m.digest()]


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that a pair with this Jaccard shares at least one LSH band (the S-curve)."""
    return float(1 - (1 - similarity**rows) ** bands)


def optimal_bands(threshold: float, num_perm: int, min_recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest spurious candidates) that still makes a pair at exactly
    `threshold` a candidate with probability >= min_recall. Candidates are verified afterwards, so a false
    candidate costs one comparison while a missed one is a duplicate left in the corpus: favour recall."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= min_recall:
            return bands, rows
    return num_perm, 1


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root, so the root is the cluster's first document
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DedupResult:
    duplicate_of: dict[int, int] = field(default_factory=dict)  # dropped doc -> kept doc
    kind: dict[int, str] = field(default_factory=dict)  # dropped doc -> exact_duplicate | near_duplicate
    similarity: dict[int, float] = field(default_factory=dict)  # dropped doc -> estimated Jaccard to kept
    clusters: list[list[int]] = field(default_factory=list)  # [kept, dropped...], largest first
    candidate_pairs: int = 0
    bands: int = 0
    rows: int = 0


class Deduper:
    """Collects (doc index, exact key, signature) in document order, then finds duplicates in one pass."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.ids: list[int] = []
        self.keys: list[str] = []
        self._sigs: list[np.ndarray] = []

    def add(self, doc: int, key: str, sig: list[int]) -> None:
        assert not self.ids or doc > self.ids[-1], "documents must be added in order"
        self.ids.append(doc)
        self.keys.append(key)
        self._sigs.append(np.asarray(sig, dtype=np.uint32))

    def run(self) -> DedupResult:
        cfg = self.cfg
        res = DedupResult()
        n = len(self.ids)
        uf = _UnionFind(n)
        exact_of: dict[int, int] = {}
        if cfg.exact:
            first: dict[str, int] = {}
            for i, key in enumerate(self.keys):
                j = first.setdefault(key, i)
                if j != i:
                    exact_of[i] = j
                    uf.union(i, j)
        if cfg.near and n > 1:
            sigs = np.stack(self._sigs) if self._sigs else np.zeros((0, cfg.num_perm), np.uint32)
            b = cfg.bands or optimal_bands(cfg.threshold, cfg.num_perm)[0]
            r = max(1, cfg.num_perm // b)
            b = min(b, cfg.num_perm // r)
            res.bands, res.rows = b, r
            alive = [i for i in range(n) if i not in exact_of]  # exact copies add nothing new
            checked: set[tuple[int, int]] = set()
            for band in range(b):
                buckets: dict[bytes, list[int]] = {}
                block = sigs[:, band * r : (band + 1) * r]
                for i in alive:
                    buckets.setdefault(block[i].tobytes(), []).append(i)
                for members in buckets.values():
                    if len(members) < 2:
                        continue
                    if len(members) <= _MAX_ALL_PAIRS:
                        pairs = [(a, c) for k, a in enumerate(members) for c in members[k + 1 :]]
                    else:
                        pairs = [(members[0], c) for c in members[1:]]
                    for pair in pairs:
                        if pair in checked:
                            continue
                        checked.add(pair)
                        if uf.find(pair[0]) == uf.find(pair[1]):
                            continue
                        sim = float(np.mean(sigs[pair[0]] == sigs[pair[1]]))
                        if sim >= cfg.threshold:
                            uf.union(*pair)
            res.candidate_pairs = len(checked)
        else:
            sigs = None
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(uf.find(i), []).append(i)
        for root, members in groups.items():
            if len(members) < 2:
                continue
            res.clusters.append([self.ids[m] for m in members])
            for m in members[1:]:
                doc = self.ids[m]
                res.duplicate_of[doc] = self.ids[root]
                res.kind[doc] = "exact_duplicate" if m in exact_of else "near_duplicate"
                if sigs is not None:
                    res.similarity[doc] = round(float(np.mean(sigs[m] == sigs[root])), 4)
                else:
                    res.similarity[doc] = 1.0
        res.clusters.sort(key=lambda c: (-len(c), c[0]))
        return res


__all__ = [
    "DedupConfig",
    "DedupResult",
    "Deduper",
    "candidate_probability",
    "exact_key",
    "optimal_bands",
    "shingles",
    "signature",
]
