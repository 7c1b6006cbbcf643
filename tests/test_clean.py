"""Normalisation, boilerplate stripping, each quality rule and the wordlist filter, on exact inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.clean import (
    Boilerplate,
    CleanConfig,
    FilterConfig,
    QualityConfig,
    Wordlist,
    normalize,
    quality_reason,
)
from lmforge.errors import ConfigError

PROSE = " ".join(["The quick brown fox jumps over the lazy dog while the farmer sleeps."] * 6)


def test_normalize() -> None:
    raw = "ﬁne  \r\ncafe\u0301\x07\t \r\n\n"
    assert normalize(raw, "NFC") == "ﬁne\ncafé"
    assert normalize(raw, "NFKC") == "fine\ncafé"
    assert normalize(raw, "none") == "ﬁne\ncafe\u0301"


def test_gutenberg_header_and_footer_are_cut() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be, or not to be.\n\n"
        "THE END\n\nEnd of the Project Gutenberg EBook of Hamlet\nlicence text\n"
    )
    out, removed = Boilerplate(CleanConfig())(text)
    assert out == "HAMLET\nTo be, or not to be."
    assert removed == len(text) - len(out)
    assert Boilerplate(CleanConfig(strip_boilerplate=False))(text) == (text, 0)


def test_edge_patterns_only_touch_the_edges() -> None:
    body = "\n".join(f"line {i}" for i in range(40))
    text = f"{body}\nTHE END\n{body}\nFINIS. The Tragedie of Hamlet"
    out, _ = Boilerplate(CleanConfig(edge_lines=5))(text)
    assert "THE END" in out and "FINIS" not in out  # mid-text THE END is 41 lines from the edge


def test_bad_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"clean.footer_patterns: invalid regex '\('"):
        Boilerplate(CleanConfig(footer_patterns=["("]))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_short"),
        ("x" * 300, "few_words"),
        ("12 34 56 78 90 " * 30, "alpha_ratio"),
        ("{alpha} [beta] <gamma> #delta " * 20, "symbol_ratio"),
        ("\n".join(["same line here"] * 10 + ["other words"] * 2 + [PROSE]), "repeated_lines"),
        (PROSE, None),
    ],
)
def test_quality_rules(text: str, reason: str | None) -> None:
    q = QualityConfig(min_chars=100, max_chars=10_000, min_words=10)
    assert quality_reason(text, q) == reason


def test_too_long_and_exact_ratio_bounds() -> None:
    assert quality_reason(PROSE * 3, QualityConfig(min_chars=10, max_chars=1000)) == "too_long"
    # 8 letters + 2 digits out of 10 non-space characters: alpha ratio 0.8 passes at 0.8, fails at 0.81
    text = "abcd ef gh 12 " * 20
    assert quality_reason(text, QualityConfig(min_chars=10, min_words=1, min_alpha_ratio=0.8)) is None
    assert (
        quality_reason(text, QualityConfig(min_chars=10, min_words=1, min_alpha_ratio=0.81)) == "alpha_ratio"
    )
    # 4 of 10 lines repeat an earlier one: 0.4
    lines = "\n".join(["a b c", "d e f", "a b c", "a b c", "g h", "d e f", "i j", "k l", "m n", "g h"])
    assert quality_reason(lines, QualityConfig(min_chars=1, min_words=1, max_repeated_line_ratio=0.4)) is None
    assert (
        quality_reason(lines, QualityConfig(min_chars=1, min_words=1, max_repeated_line_ratio=0.39))
        == "repeated_lines"
    )


def test_wordlist(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# comment\nBadword\nvery bad phrase\n")
    wl = Wordlist(FilterConfig(words_file=str(words), max_hits=1))
    assert wl.hits("a badword, a BADWORD and a very bad phrase; badwords do not count") == 3
    assert wl.rejects("badword badword") and not wl.rejects("one badword only")
    assert not Wordlist(FilterConfig()).rejects("badword")
    with pytest.raises(ConfigError, match=r"filter\.words_file: .*missing\.txt not found"):
        Wordlist(FilterConfig(words_file=str(tmp_path / "missing.txt")))
    # punctuation at an entry's edge still matches whole words, the same as the server's output filter
    from lmforge.serve.filters import OutputFilter

    words.write_text("c++\n.net\n")
    text = "I write c++ and .net daily, not c++x"
    assert Wordlist(FilterConfig(words_file=str(words))).hits(text) == 2
    assert OutputFilter.from_file(words).cut(text) == ("I write ", True)
