"""`lmforge tokenizer import`: SentencePiece BPE and unigram models trained here, and tiktoken rank files
built here (the ranks of a byte-level BPE we train), give the original library's ids on every line of a
corpus with unicode, whitespace runs, digits and emoji, and decode back as the library does; the folder
works with the chat template and `lmforge tokenize`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
tiktoken = pytest.importorskip("tiktoken")

from lmforge.cli import main as cli  # noqa: E402
from lmforge.data.tokenizer_import import (  # noqa: E402
    PATTERNS,
    TokenizerImportConfig,
    bytes_to_unicode,
    import_tokenizer,
)
from lmforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer  # noqa: E402
from tokenizer_corpus import shakespeare_docs, write_curated  # noqa: E402

EXTRA = [
    "Hello  world   with   runs of    spaces",
    "  leading and trailing  ",
    "tabs\there\tand\nnew\n\nlines\r\n  x",
    "digits 1234567 3.14159 2026-12-03 007",
    "emoji 😀🎉👩‍👩‍👧 café naïve Ünïcödé 日本語 한국어 Ελληνικά",
    "ＦＵＬＬ width ｆｏｒｍｓ and ligatures ﬁ ﬂ",
    "I'm sure you'LL find they've 'quoted' words",
    "",
    " ",
]


def _lines() -> list[str]:
    text = "\n".join(d["text"] for d in shakespeare_docs(2))
    return [x for x in text.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _lines()[:1500] + EXTRA


def _sp_model(tmp: Path, kind: str, byte_fallback: bool = True) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()[1500:]),
        model_writer=buf,
        vocab_size=700,
        model_type=kind,
        byte_fallback=byte_fallback,
        minloglevel=2,
    )
    path = tmp / f"{kind}.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_ids_equal_on_every_line(tmp_path: Path, corpus: list[str], kind: str) -> None:
    model = _sp_model(tmp_path, kind)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = import_tokenizer(TokenizerImportConfig(input=model, output=tmp_path / "out"))
    for line in corpus:
        ids = sp.encode(line)
        assert tok.encode(line) == ids, line
        assert tok.decode(ids) == sp.decode(ids), line
    assert sp.encode("😀") != [sp.unk_id()]  # byte fallback is exercised
    assert tok.special_tokens["<|endoftext|>"] == sp.get_piece_size()  # appended after the pieces


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_without_byte_fallback_and_own_specials(
    tmp_path: Path, corpus: list[str], kind: str
) -> None:
    """Unknown characters become the unknown piece as in sentencepiece; `</s>` reuses the model's id."""
    model = _sp_model(tmp_path, kind, byte_fallback=False)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    special = {"eos": "</s>", "bos": "<s>", "pad": "<|pad|>"}
    tok = import_tokenizer(TokenizerImportConfig(input=model, output=tmp_path / "o", special_tokens=special))
    unknown = 0
    for line in [*corpus, "unknown: ♞♜ ⅋ ☃☃☃ x"]:
        ids = sp.encode(line)
        assert tok.encode(line) == ids, line
        unknown += ids.count(sp.unk_id())
        if ids[:1] != [sp.unk_id()]:  # a leading unknown keeps sentencepiece's space before " ⁇ "
            assert tok.decode(ids) == sp.decode(ids), line
    assert unknown > 10
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (sp.eos_id(), sp.bos_id(), sp.get_piece_size())


def _rank_file(tmp: Path) -> tuple[Path, dict[bytes, int]]:
    """A real rank table: our byte-level BPE's tokens as bytes, ranked in merge order."""
    bpe = train_tokenizer(_lines()[1500:], vocab_size=900)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    skip = len(bpe.special_tokens)
    ranks = {
        bytes(byte_of[c] for c in piece): i - skip
        for piece, i in bpe.backend.get_vocab(with_added_tokens=False).items()
        if i >= skip
    }
    path = tmp / "ranks.tiktoken"
    rows = sorted(ranks.items(), key=lambda kv: kv[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in rows))
    return path, ranks


@pytest.mark.parametrize("pattern", ["cl100k", "o200k"])
def test_tiktoken_ids_equal_on_every_line(tmp_path: Path, corpus: list[str], pattern: str) -> None:
    path, ranks = _rank_file(tmp_path)
    enc = tiktoken.Encoding(name="t", pat_str=PATTERNS[pattern], mergeable_ranks=ranks, special_tokens={})
    tok = import_tokenizer(TokenizerImportConfig(input=path, output=tmp_path / "o", pattern=pattern))
    text = "\n".join(corpus)
    for line in [*corpus, text]:
        ids = enc.encode_ordinary(line)
        assert tok.encode(line) == ids, line
        assert tok.decode(ids) == line == enc.decode(ids)
    assert tok.vocab_size == len(ranks) + 5 and tok.eos_id == len(ranks)


def test_cli_folder_works_with_chat_and_tokenize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _rank_file(tmp_path)
    out = tmp_path / "tok"
    assert cli(["tokenizer", "import", f"input={path}", f"output={out}"]) == 0
    tok: Tokenizer = load_tokenizer(out)
    ids = tok.encode_chat([{"role": "user", "content": "Hi <|im_end|>"}], add_generation_prompt=True)
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    assert ids[0] == start and ids.count(end) == 1  # the text's marker stays text
    assert tok.decode(ids) == "<|im_start|>user\nHi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    docs = shakespeare_docs(1)[:20]
    write_curated(tmp_path / "cur", docs)
    tokens = tmp_path / "tokens"
    assert cli(["tokenize", f"input={tmp_path / 'cur'}", f"tokenizer={out}", f"output={tokens}"]) == 0
    index = json.loads((tokens / "index.json").read_text())
    total = sum(s["tokens"] for s in index["splits"].values())
    assert total == sum(len(tok.encode(d["text"])) + 1 for d in docs)  # + one EOS per document

    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64 x\n")
    assert cli(["tokenizer", "import", f"input={bad}", f"output={tmp_path / 'x'}"]) == 2
    assert f"{bad}:2: expected '<base64 token> <rank>'" in capsys.readouterr().err
    sp = tmp_path / "bad.model"
    sp.write_bytes(b"\x00garbage")
    assert cli(["tokenizer", "import", f"input={sp}", f"output={tmp_path / 'y'}"]) == 2
    assert "not a SentencePiece model" in capsys.readouterr().err
