"""Word lists: one word or phrase per line, matched case-insensitively as whole words.

Shared by the data content filter (`prepare`) and the server's output filter, so a list behaves the same
in both. Boundaries are "no word character on either side" rather than `\\b`, so entries that start or
end with punctuation (`c++`, `.net`) match too.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.io import read_lines


def read_wordlist(path: Path | str, what: str) -> list[str]:
    """The distinct entries of a word-list file (blank and `#` lines skipped); `what` names the config key."""
    words = list(dict.fromkeys(w for _, w in read_lines(path, what, error=ConfigError)))
    if not words:
        raise ConfigError(f"{what}: {path} has no words")
    return words


def word_pattern(words: list[str]) -> re.Pattern[str]:
    """Any entry as a whole word; longer entries first so a phrase wins over its first word."""
    words = sorted({w.strip() for w in words if w.strip()}, key=lambda w: (-len(w), w))
    if not words:
        raise ConfigError("the word list is empty")
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
