"""The optional output wordlist filter of `lmforge serve`: a listed word ends the answer before it.

Words match whole and case-insensitively. Streaming holds back the last `longest word` characters, so a
listed word split across two token deltas is still caught before any of it is sent; when one is found, the
text up to it is released and the choice ends with `finish_reason: "content_filter"` (OpenAI's name).

    f = OutputFilter.from_file("blocked.txt")   # one word or phrase per line, `#` comments
    s = f.stream()
    sent = s.feed("some delta")  # text that is safe to send now; s.blocked turns True on a hit
    sent += s.flush()            # at the end of the generation
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.wordlist import read_wordlist, word_pattern


class OutputFilter:
    def __init__(self, words: list[str]) -> None:
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise ConfigError("output filter: the wordlist is empty")
        self.holdback = max(len(w) for w in words) + 1  # +1: the character that closes the word boundary
        self.pattern = word_pattern(words)

    @classmethod
    def from_file(cls, path: Path | str) -> OutputFilter:
        return cls(read_wordlist(path, "output_wordlist (one word or phrase per line)"))

    def cut(self, text: str) -> tuple[str, bool]:
        """(text before the first listed word, whether one was found) for a whole answer."""
        m = self.pattern.search(text)
        return (text, False) if m is None else (text[: m.start()], True)

    def stream(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """Per-choice state of the filter over a stream of text deltas."""

    def __init__(self, f: OutputFilter) -> None:
        self.f = f
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.blocked = False

    def feed(self, delta: str) -> str:
        if self.blocked:
            return ""
        self.text += delta
        start = max(0, self.sent - self.f.holdback)  # a match may begin in text already released
        m = self.f.pattern.search(self.text, start)
        # A match that ends the text so far may still grow into a longer word ("ass" -> "assist"): wait.
        if m is not None and m.end() < len(self.text) and m.start() >= self.sent:
            out = self.text[self.sent : m.start()]
            self.sent = m.start()
            self.blocked = True
            return out
        safe = max(self.sent, len(self.text) - self.f.holdback)
        out = self.text[self.sent : safe]
        self.sent = safe
        return out

    def flush(self) -> str:
        if self.blocked:
            return ""
        cut, hit = self.f.cut(self.text)
        if hit and len(cut) >= self.sent:
            self.blocked = True
            out = cut[self.sent :]
        else:
            out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
