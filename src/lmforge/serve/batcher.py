"""The engine's worker thread: requests from many HTTP handlers share batches of one `Engine`.

    batcher = Batcher(engine, max_batch_size=8, max_queue=64)
    batcher.start()
    batcher.submit([Job(request, choice=0, sink=sink)])   # raises QueueFull when the queue is full
    # sink(choice, TokenEvent | EngineFailure | DONE) is called from the worker thread

The `Engine` is not thread-safe, so one thread owns it. It takes whatever is queued (up to
`max_batch_size` rows, after waiting `batch_wait_s` for stragglers when it was idle) and starts them as one
`stream_batch` call: every row of a batch starts together. Rows that arrive while batches run need not wait
for them to finish: when every running batch still has more than `interleave_min_steps` decode steps to
go, they form a new batch at once, and the worker steps the running batches in turn (up to
`max_running_batches`; each `stream_batch` generator owns its KV cache, one decode step is one `next()`).
This is iteration-level scheduling across batches: a short request is not stuck behind a long one, though
two batches cost two forwards per step where true continuous batching (rows joining a running batch) would
cost one; the engine does not support that yet. Otherwise newcomers wait for the batch about to end and
start together. `max_running_batches=1` is plain static batching. A row whose `cancelled` event is set
(client gone, timeout) stops at the engine's next step. The queue is bounded: a full one refuses new work at once rather than letting latency grow.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.infer.engine import TokenEvent

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """The request queue cannot take these rows now (answer 503 with Retry-After)."""


class EngineFailure:
    """Sent to a row's sink when the engine raised while running its batch (the message is logged)."""

    def __init__(self, message: str) -> None:
        self.message = message


DONE = None  # the last item every row's sink receives


@dataclass
class Job:
    """One row: an `infer.engine.GenerationRequest`, the choice index it answers, where its events go."""

    request: Any
    choice: int
    sink: Callable[[int, Any], None]
    finished: bool = field(default=False, init=False)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0
    failures: int = 0
    tokens: int = 0  # tokens generated, all rows
    cancelled: int = 0  # rows that ended "cancelled" (client gone, timeout, filtered), queued or running


@dataclass
class _Batch:
    jobs: list[Job]
    gen: Iterator[list[TokenEvent]]  # Engine.stream_batch: one next() = one decode step
    started: bool = False
    steps: int = 0

    def steps_left(self) -> int:
        """Decode steps until the longest unfinished row reaches its max_tokens (an upper bound)."""
        return max((j.request.params.max_tokens for j in self.jobs if not j.finished), default=0) - self.steps


class Batcher:
    def __init__(
        self,
        engine: Any,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.005,
        max_running_batches: int = 4,
        interleave_min_steps: int = 64,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_running_batches = max_running_batches
        self.interleave_min_steps = interleave_min_steps
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()
        self.busy_rows = 0  # rows in the running batches (for /health)
        self._last_rows = 0  # rows of the last batch started

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the running batch; queued rows are cancelled."""
        self._stop.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._finish(job, "cancelled")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` (the n choices of one request) or none of them."""
        with self._submit_lock:
            if self._stop.is_set() or self._queue.qsize() + len(jobs) > self.max_queue:
                raise QueueFull(f"the server is busy ({self._queue.qsize()} requests queued); retry shortly")
            for job in jobs:
                self._queue.put_nowait(job)

    # -- worker thread -----------------------------------------------------------------------------
    def _take(self, idle: bool) -> list[Job]:
        """Up to max_batch_size queued rows; when idle, block briefly and wait batch_wait_s for company."""
        batch: list[Job] = []
        try:
            batch.append(self._queue.get(timeout=0.1) if idle else self._queue.get_nowait())
        except queue.Empty:
            return []
        # Wait for company only when the last batch had some: a lone sequential client pays no wait.
        wait = self.batch_wait_s if idle and self._last_rows != 1 else 0.0
        deadline = time.monotonic() + wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        live = []
        for job in batch:  # rows cancelled while queued never reach the engine
            if job.request.cancelled is not None and job.request.cancelled.is_set():
                self._finish(job, "cancelled")
            else:
                live.append(job)
        return live

    def _start(self, jobs: list[Job]) -> _Batch:
        self._last_rows = len(jobs)
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        self.stats.largest = max(self.stats.largest, len(jobs))
        return _Batch(jobs, iter(self.engine.stream_batch([job.request for job in jobs])))

    def _run(self) -> None:
        running: list[_Batch] = []
        while not self._stop.is_set():
            # Start a new batch beside the running ones only when all of them are far from done: else the
            # newcomers wait a little and batch together (fewer, fuller forwards: more tokens/s).
            if len(running) < self.max_running_batches and all(
                b.steps_left() > self.interleave_min_steps for b in running
            ):
                jobs = self._take(idle=not running)
                if jobs:
                    running.append(self._start(jobs))
            self.busy_rows = sum(len(b.jobs) for b in running)
            for b in list(running):  # one decode step of every running batch, in turn
                running.remove(b)
                running.extend(self._step(b))
        for b in running:
            for job in b.jobs:
                if not job.finished:
                    self._finish(job, "cancelled")
        self.busy_rows = 0

    def _step(self, b: _Batch) -> list[_Batch]:
        """Advance `b` by one step; the batches to keep running (b itself, or none, or its rows alone)."""
        try:
            events = next(b.gen)
        except StopIteration:
            self._end(b)
            return []
        except Exception as e:  # a broken batch must not take the server down: fail its rows, keep serving
            self.stats.failures += 1
            log.error("engine failed on a batch of %d rows: %s: %s", len(b.jobs), type(e).__name__, e)
            if not b.started and len(b.jobs) > 1:
                # Nothing was sent yet: run the rows one by one, so one bad row fails only itself.
                self.stats.batches -= 1
                self.stats.rows -= len(b.jobs)
                return [self._start([job]) for job in b.jobs]
            for job in b.jobs:
                if not job.finished:
                    job.sink(job.choice, EngineFailure(f"generation failed ({type(e).__name__})"))
                    job.finished = True
                    job.sink(job.choice, DONE)
            return []
        b.started = True
        b.steps += 1
        for ev in events:
            job = b.jobs[ev.index]
            self.stats.tokens += ev.token_id is not None
            self.stats.cancelled += ev.finish_reason == "cancelled"
            job.sink(job.choice, ev)
            if ev.finish_reason is not None:
                job.finished = True
                job.sink(job.choice, DONE)
        return [b]

    def _end(self, b: _Batch) -> None:
        for job in b.jobs:
            if not job.finished:  # the engine ended without a finish event: still tell the waiter
                self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        self.stats.cancelled += reason == "cancelled"
        job.sink(job.choice, TokenEvent(0, None, "", reason))
        job.finished = True
        job.sink(job.choice, DONE)
