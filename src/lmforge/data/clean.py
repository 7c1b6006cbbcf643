"""Text cleaning for `lmforge prepare`: Unicode normalisation, header/footer boilerplate, quality rules, wordlist.

    from lmforge.data.clean import CleanConfig, QualityConfig, normalize, strip_boilerplate, quality_reason
    text = normalize(raw, "NFC")
    text, removed = strip_boilerplate(text, CleanConfig())
    reason = quality_reason(text, QualityConfig())  # None = keep, else the name of the first failed rule

Rules run in a fixed order and a document is dropped by the first one it fails, so the report can give
documents in and out per rule. All measures are on the cleaned text.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field

from lmforge.config import ConfigPath, Section
from lmforge.errors import ConfigError
from lmforge.wordlist import read_wordlist, word_pattern

# Project Gutenberg wraps every etext in a licence header and footer between these markers.
GUTENBERG_START = r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
GUTENBERG_END = r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_ASCII_SYMBOL = re.compile(r"[#$%&*+<=>@\\^_`|~{}\[\]]")
_LETTER = re.compile(r"[^\W\d_]")  # \w minus digits and underscore = letters in any script
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class CleanConfig(Section):
    unicode: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description="Unicode normalisation (NFKC also folds compatibility forms such as ligatures, full-width)",
    )
    strip_boilerplate: bool = Field(True, description="remove licence headers/footers and end marks")
    header_patterns: list[str] = Field(
        [r"^\s*(Produced by|This e(Book|text) is for the use of anyone).*$"],
        description="regexes (per line) removed from the first `edge_lines` lines",
    )
    footer_patterns: list[str] = Field(
        [r"^\s*(THE END\.?|FINIS\b.*|End of (the )?Project Gutenberg.*)$"],
        description="regexes (per line) removed from the last `edge_lines` lines",
    )
    edge_lines: int = Field(
        12, ge=0, description="how many lines at each end the header/footer patterns look at"
    )


class QualityConfig(Section):
    min_chars: int = Field(200, ge=0, description="drop shorter documents (characters after cleaning)")
    max_chars: int = Field(20_000_000, ge=1, description="drop longer documents")
    min_words: int = Field(20, ge=0, description="drop documents with fewer whitespace-separated words")
    min_alpha_ratio: float = Field(
        0.5, ge=0, le=1, description="drop if letters / non-space characters is lower (tables, numbers, junk)"
    )
    max_symbol_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="drop if symbols (#$%&*+<=>@\\^_`|~{}[] and Unicode S*) / non-space is higher",
    )
    max_repeated_line_ratio: float = Field(
        0.3,
        ge=0,
        le=1,
        description="drop if the share of non-empty lines that repeat an earlier line is higher",
    )


class FilterConfig(Section):
    words_file: ConfigPath | None = Field(
        None,
        description="optional wordlist (one word or phrase per line, case-insensitive) for a content filter",
    )
    max_hits: int = Field(0, ge=0, description="drop a document with more wordlist hits than this")


RULES = ("too_short", "too_long", "few_words", "alpha_ratio", "symbol_ratio", "repeated_lines")


def normalize(text: str, form: str) -> str:
    """Unicode form, `\\n` newlines, no control characters, no trailing spaces, no blank edges."""
    if form != "none":
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    return text.strip("\n")


def _compile(patterns: list[str], key: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"clean.{key}: invalid regex {p!r} ({e})") from None
    return out


class Boilerplate:
    """Compiled header/footer rules (compile once per worker)."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.enabled = cfg.strip_boilerplate
        self.start = re.compile(GUTENBERG_START, re.MULTILINE | re.IGNORECASE)
        self.end = re.compile(GUTENBERG_END, re.MULTILINE | re.IGNORECASE)
        self.header = _compile(cfg.header_patterns, "header_patterns")
        self.footer = _compile(cfg.footer_patterns, "footer_patterns")
        self.edge = cfg.edge_lines

    def __call__(self, text: str) -> tuple[str, int]:
        """(text without boilerplate, characters removed)."""
        if not self.enabled:
            return text, 0
        before = len(text)
        m = self.start.search(text)
        if m:  # everything up to the START marker is the licence header
            text = text[m.end() :]
        m = self.end.search(text)
        if m:  # everything from the END marker on is the licence footer
            text = text[: m.start()]
        lines = text.split("\n")
        n = len(lines)
        drop = set()
        for i in range(min(self.edge, n)):
            if any(p.match(lines[i]) for p in self.header):
                drop.add(i)
        for i in range(max(0, n - self.edge), n):
            if any(p.match(lines[i]) for p in self.footer):
                drop.add(i)
        if drop:
            text = "\n".join(line for i, line in enumerate(lines) if i not in drop)
        text = text.strip("\n")
        return text, before - len(text)


def _count_symbols(text: str) -> int:
    ascii_symbols = len(_ASCII_SYMBOL.findall(text))
    return ascii_symbols + sum(unicodedata.category(c).startswith("S") for c in _NON_ASCII.findall(text))


def quality_reason(text: str, q: QualityConfig) -> str | None:
    """The first rule in RULES that `text` fails, or None."""
    n = len(text)
    if n < q.min_chars:
        return "too_short"
    if n > q.max_chars:
        return "too_long"
    if len(text.split()) < q.min_words:
        return "few_words"
    dense = n - sum(text.count(c) for c in " \n\t")
    if dense:
        alpha = len(_LETTER.findall(text))
        if alpha / dense < q.min_alpha_ratio:
            return "alpha_ratio"
        symbols = _count_symbols(text)
        if symbols / dense > q.max_symbol_ratio:
            return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if lines and 1 - len(set(lines)) / len(lines) > q.max_repeated_line_ratio:
        return "repeated_lines"
    return None


class Wordlist:
    """Case-insensitive whole-word (or phrase) matcher for the optional content filter."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.max_hits = cfg.max_hits
        self.pattern: re.Pattern[str] | None = None
        if cfg.words_file is None:
            return
        self.pattern = word_pattern(read_wordlist(cfg.words_file, "filter.words_file"))

    def hits(self, text: str) -> int:
        return 0 if self.pattern is None else sum(1 for _ in self.pattern.finditer(text))

    def rejects(self, text: str) -> bool:
        return self.pattern is not None and self.hits(text) > self.max_hits


__all__ = [
    "RULES",
    "Boilerplate",
    "CleanConfig",
    "FilterConfig",
    "QualityConfig",
    "Wordlist",
    "normalize",
    "quality_reason",
]
