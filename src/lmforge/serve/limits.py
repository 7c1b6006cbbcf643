"""Per-key request and token rate limits, and the body-size cap, for `lmforge serve`.

A sliding 60-second window per key: a request is admitted when the key's requests in the last minute are
below `requests_per_minute` and its tokens in the last minute plus this request's worst case (prompt +
n x max_tokens) fit in `tokens_per_minute`. The worst case is reserved at admission (so concurrent requests
cannot overshoot together) and corrected to the tokens actually used when the request ends. A refusal
carries the seconds until enough of the window has expired: the `Retry-After` of the 429.

    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=10_000)
    ticket = limiter.count("key-1a2b3c4d")     # on arrival; raises RateLimited(retry_after=...)
    limiter.charge(ticket, tokens=300)         # once the prompt is tokenized: prompt + n x max_tokens
    limiter.settle(ticket, used=120)           # when it ends
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

WINDOW_S = 60.0


class RateLimited(Exception):
    """Over a per-minute limit: answer 429 with `Retry-After: retry_after`."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Exception):
    """A request that can never fit the limit, whatever the wait (answered 400, not 429)."""


@dataclass
class Ticket:
    """One admitted request's entry in its key's window: [time, tokens], tokens corrected by `settle`."""

    key: str
    entry: list[float]


class RateLimiter:
    """Sliding-window requests/minute and tokens/minute per key (0 = no limit). Thread-safe."""

    def __init__(
        self,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.clock = clock
        self._windows: dict[str, deque[list[float]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _expire(self, window: deque[list[float]], now: float) -> None:
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()

    def admit(self, key: str, tokens: int = 0) -> Ticket:
        """Admit one request needing at most `tokens`, or raise RateLimited / TooLarge."""
        ticket = self.count(key)
        self.charge(ticket, tokens)
        return ticket

    def count(self, key: str) -> Ticket:
        """Count one request against requests/minute (before its body is even read), or raise RateLimited."""
        with self._lock:
            now = self.clock()
            window = self._windows[key]
            self._expire(window, now)
            if self.rpm and len(window) >= self.rpm:
                # The oldest of the last `rpm` requests must leave the window first.
                wait = window[-self.rpm][0] + WINDOW_S - now
                raise RateLimited(f"rate limit: {self.rpm} requests per minute", _ceil(wait))
            entry = [now, 0.0]
            window.append(entry)
            return Ticket(key, entry)

    def charge(self, ticket: Ticket, tokens: int) -> None:
        """Reserve a counted request's worst-case tokens, or raise RateLimited / TooLarge."""
        if self.tpm and tokens > self.tpm:
            raise TooLarge(
                f"this request may use {tokens} tokens (prompt + n x max_tokens), more than this key's "
                f"limit of {self.tpm} tokens per minute; lower max_tokens or n"
            )
        with self._lock:
            now = self.clock()
            window = self._windows[ticket.key]
            self._expire(window, now)
            if self.tpm:
                others = [e for e in window if e is not ticket.entry]
                used = sum(e[1] for e in others)
                if used + tokens > self.tpm:
                    wait, freed = 0.0, 0.0
                    for t, n in others:  # oldest first: how long until enough tokens expire
                        freed += n
                        wait = t + WINDOW_S - now
                        if used - freed + tokens <= self.tpm:
                            break
                    raise RateLimited(
                        f"rate limit: {self.tpm} tokens per minute ({int(used)} used in the last minute, "
                        f"this request may use {tokens})",
                        _ceil(wait),
                    )
            ticket.entry[1] = float(tokens)

    def settle(self, ticket: Ticket, used: int) -> None:
        """Replace the reserved worst case by the tokens the request really used."""
        with self._lock:
            ticket.entry[1] = float(used)


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class BodyTooLarge(Exception):
    """The request body is over the cap: answer 413."""


class BodyTimeout(Exception):
    """The request body did not arrive in time: answer 408 and close the connection."""


async def read_capped(chunks: AsyncIterator[bytes], limit: int, content_length: str | None) -> bytes:
    """Read a request body, refusing it (BodyTooLarge) past `limit` bytes without buffering more.

    A Content-Length over the limit is refused before reading anything; a chunked body (no length) or a
    lying one is cut off as soon as the running total passes the limit.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            declared = -1
        if declared > limit:
            raise BodyTooLarge(f"request body is {declared} bytes; this server accepts at most {limit}")
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"request body is over {limit} bytes, the most this server accepts")
        parts.append(chunk)
    return b"".join(parts)
