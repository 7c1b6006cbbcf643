"""Progress of work that takes more than a few seconds, the same way in every command.

    with Progress("export hf parity", total=206, unit="passes") as bar:
        for ...:
            bar.advance()

When stderr is a terminal: a live rich bar (done/total, rate, time left). Otherwise (a log file, CI, a pipe):
one plain line on stderr every LMFORGE_PROGRESS_INTERVAL seconds (default 10; 0 = at every update), and a
last one when the work ends, so that a log always shows how far a job got and how long it still needs:

    export hf parity: 120/206 passes (58%)  rate 31.2 passes/s  eta 0:00:03  elapsed 0:00:04

The fields are fixed (`done/total`, `rate`, `eta`, `elapsed`; `eta ?` while nothing is known), so that a
log can be grepped or parsed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from lmforge.errors import ConfigError

INTERVAL_ENV = "LMFORGE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between two log lines


def interval() -> float:
    """Seconds between two progress lines in a log, from LMFORGE_PROGRESS_INTERVAL."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def clock(seconds: float | None) -> str:
    """H:MM:SS, or ? when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta(done: float, total: float | None, rate: float) -> float | None:
    """Seconds left at `rate` units per second; None when the total or the rate is unknown."""
    if total is None or rate <= 0:
        return None
    return max(total - done, 0.0) / rate


def rate_text(rate: float) -> str:
    return f"{rate:.3g}" if rate < 1000 else f"{rate:,.0f}"


class Progress:
    """A live bar on a terminal, else periodic log lines with done/total, rate, ETA (see the module doc).

    `done` starts a resumed job part way (the rate counts only what this process did); `enabled=False`
    (e.g. progress=false, or a rank other than 0) shows nothing. `note` is a short free text at the end.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "",
        *,
        done: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = self._start = done
        self.note = ""
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and self.stream.isatty()
        self.interval = interval() if enabled and not self.live else 0.0
        self.started = self._last = time.perf_counter()
        self._printed: int | None = None  # `done` at the last log line
        self._bar: RichProgress | None = None
        if self.live:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task(label, total=total, completed=done, rate="", note="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and kind is None and self._printed != self.done and self._long_enough():
            self._emit()  # the closing line

    def _long_enough(self) -> bool:
        """A job logs at all once it ran for an interval: short jobs stay quiet."""
        return self._printed is not None or time.perf_counter() - self.started >= self.interval

    @property
    def rate(self) -> float:
        return (self.done - self._start) / max(time.perf_counter() - self.started, 1e-9)

    def set_total(self, total: int | None) -> None:
        """The total, once the work knows it (after reading its input); shown with the next update."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note=note)

    def update(self, done: int, *, total: int | None = None, note: str | None = None) -> None:
        """Set the count (and the total, once it is known); logs a line when the interval has passed."""
        self.done = done
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            rate = f"{rate_text(self.rate)} {self.unit}/s".strip()
            self._bar.update(self._task, completed=done, total=self.total, rate=rate, note=self.note)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def line(self) -> str:
        """The log line for the current state."""
        unit = f" {self.unit}" if self.unit else ""
        if self.total is not None:
            pct = f" ({self.done / self.total:.0%})" if self.total else ""
            count = f"{self.done}/{self.total}{unit}{pct}"
        else:
            count = f"{self.done}{unit}"
        rate = self.rate
        text = (
            f"{self.label}: {count}  rate {rate_text(rate)}{unit}/s  eta {clock(eta(self.done, self.total, rate))}"
            f"  elapsed {clock(time.perf_counter() - self.started)}"
        )
        return f"{text}  {self.note}" if self.note else text

    def _emit(self) -> None:
        self._printed = self.done
        print(self.line(), file=self.stream, flush=True)


__all__ = ["DEFAULT_INTERVAL", "INTERVAL_ENV", "Progress", "clock", "eta", "interval"]
