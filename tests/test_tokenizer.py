"""Tokenizer: exact round trips over arbitrary Unicode, save/load identity, transformers agreement, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.cli import main as cli
from lmforge.data.manifest import verify_manifest
from lmforge.data.shards import doc_fraction
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tokenizer_corpus import shakespeare_docs, write_curated

SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
# Arbitrary Unicode (every category but surrogates, which a Python str cannot encode to UTF-8),
# sometimes with special-token strings embedded in it.
TEXT = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS)), max_size=6).map("".join)


@pytest.fixture(scope="module")
def docs() -> list[dict[str, str]]:
    return shakespeare_docs()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, docs: list[dict[str, str]]) -> Path:
    """`lmforge tokenizer train` through the CLI on ~0.8 MB of Shakespeare."""
    root = tmp_path_factory.mktemp("tok")
    curated = write_curated(root / "curated", docs)
    rc = cli(["tokenizer", "train", f"input={curated}", f"output={root / 'tok'}", "vocab_size=1024"])
    assert rc == 0
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_layout_special_ids_and_vocab(tok: Tokenizer, tok_dir: Path) -> None:
    assert {p.name for p in tok_dir.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "report.json",
        "config.yaml",
        "manifest.json",
    }
    verify_manifest(tok_dir)
    assert tok.vocab_size == 1024
    assert tok.special_tokens == {t: i for i, t in enumerate(SPECIALS)}
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode("To be", add_bos=True) == [1, *tok.encode("To be")]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == tok.chat_template
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|bos|>", "<|endoftext|>", "<|pad|>")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_decode_encode_is_identity_on_any_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_and_compression_on_real_text(tok: Tokenizer, docs: list[dict[str, str]]) -> None:
    texts = [d["text"] for d in docs]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts
    nbytes = sum(len(t.encode()) for t in texts)
    # 1,024 tokens already cut early-modern English ~2.5x against raw UTF-8 bytes (measured 2.46).
    assert 2.35 < nbytes / sum(map(len, batch)) < 2.6


def test_save_load_gives_identical_ids_and_bytes(tok: Tokenizer, tok_dir: Path, tmp_path: Path) -> None:
    tok.save(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes()
    again = load_tokenizer(tmp_path / "again")
    sample = "ROMEO. But soft! what light through yonder window breaks?\n  Ünïcödé ✓ 漢字 🙂<|im_end|>"
    assert again.encode(sample) == tok.encode(sample) and again.special_tokens == tok.special_tokens


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_autotokenizer_gives_the_same_ids(tok: Tokenizer, hf, text: str) -> None:  # type: ignore[no-untyped-def]
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_autotokenizer_agrees_on_real_text_specials_and_chat(tok: Tokenizer, hf, docs) -> None:  # type: ignore[no-untyped-def]
    from transformers import PreTrainedTokenizerFast

    text = docs[3]["text"]
    assert hf.encode(text) == tok.encode(text)  # add_special_tokens=True adds nothing, like ours
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    messages = [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A tokenizer, good sir."},
        {"role": "user", "content": "Prove it."},
    ]
    for gen in (False, True):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.encode(ours)
    rendered = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nAnswer in verse.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(rendered)
    assert (
        ids.count(tok.special_tokens["<|im_start|>"]) == 3
        and ids.count(tok.special_tokens["<|im_end|>"]) == 2
    )
    fast = PreTrainedTokenizerFast.from_pretrained(str(Path(hf.name_or_path)))
    assert fast.encode(text) == tok.encode(text)


def test_report_counts_heldout_documents(tok: Tokenizer, tok_dir: Path, docs: list[dict[str, str]]) -> None:
    report = json.loads((tok_dir / "report.json").read_text())
    heldout = [d["text"] for d in docs if doc_fraction(d["id"], 0) < 0.02]
    assert report["heldout_documents"] == len(heldout) >= 1
    assert report["train_documents"] == len(docs) - len(heldout)
    assert report["heldout_bytes"] == sum(len(t.encode()) for t in heldout)
    assert report["heldout_tokens"] == sum(len(tok.encode(t)) for t in heldout)
    assert report["bytes_per_token"] == pytest.approx(
        report["heldout_bytes"] / report["heldout_tokens"], abs=1e-4
    )
    # Measured: 2.37 bytes/token on the 2 held-out documents (12,448 bytes) at 1,024 tokens.
    assert report["utf8_bytes_per_token"] == 1.0 and 2.2 < report["bytes_per_token"] < 2.55


def test_training_is_deterministic_and_bigger_vocab_compresses_more(docs: list[dict[str, str]]) -> None:
    texts = [d["text"] for d in docs[:60]]
    a = train_tokenizer(texts, vocab_size=600)
    b = train_tokenizer(texts, vocab_size=600)
    assert a.backend.to_str() == b.backend.to_str()
    big = train_tokenizer(texts, vocab_size=2000)
    held = [d["text"] for d in docs[60:80]]
    nbytes = sum(len(t.encode()) for t in held)
    bpt = {v: nbytes / sum(len(t.encode(x)) for x in held) for v, t in [(600, a), (2000, big)]}
    # Measured on unseen documents: 1.97 bytes/token at 600 tokens, 2.70 at 2,000.
    assert 1.85 < bpt[600] < 2.1 and 2.55 < bpt[2000] < 2.85


def test_two_documents_still_give_a_heldout_one(tmp_path: Path) -> None:
    docs = [
        {"id": "a", "text": "the cat sat on the mat " * 50},
        {"id": "b", "text": "the dog sat on the log " * 50},
    ]
    curated = write_curated(tmp_path / "c", docs)
    assert cli(["tokenizer", "train", f"input={curated}", f"output={tmp_path / 't'}", "vocab_size=300"]) == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert (report["train_documents"], report["heldout_documents"]) == (1, 1)
    assert report["heldout_bytes"] == len(docs[1]["text"])


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curated = write_curated(tmp_path / "c", [{"id": "a", "text": "x"}])
    out = tmp_path / "t"
    assert cli(["tokenizer", "train", f"input={curated}", f"output={out}", "vocab_size=100"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert cli(["tokenizer", "train", f"input={curated}", f"output={out}", "chat_template={% for %}"]) == 2
    assert "chat template does not compile" in capsys.readouterr().err
    assert cli(["tokenizer", "train", f"input={tmp_path / 'nope'}", f"output={out}"]) == 3
    assert "no manifest" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="more than once"):
        train_tokenizer(["abc"], special_tokens=_dup_specials())
    assert not out.exists()
    # The output is checked before any work: these fail on it although the input is missing too.
    out.mkdir()
    assert cli(["tokenizer", "train", f"input={tmp_path / 'nope'}", f"output={out}"]) == 2
    assert "already exists; pass overwrite=true" in capsys.readouterr().err
    assert cli(["tokenizer", "train", f"input={tmp_path / 'nope'}", "output=/proc/lmforge-test"]) == 2
    assert "output: cannot write in /proc" in capsys.readouterr().err


def _dup_specials():  # type: ignore[no-untyped-def]
    from lmforge.tokenizer import SpecialTokensConfig

    return SpecialTokensConfig(eos="<|x|>", bos="<|x|>")


def test_plain_text_copy_encodes_special_strings_as_text(tok: Tokenizer) -> None:
    text = "a<|endoftext|>b<|im_end|>"
    plain = tok.as_plain_text()
    assert tok.encode(text) == [*tok.encode("a"), 0, *tok.encode("b"), 4]
    ids = plain.encode(text)
    assert not set(ids) & set(tok.special_tokens.values()) and len(ids) > 6
    assert plain.decode(ids) == text and plain.eos_id == 0
