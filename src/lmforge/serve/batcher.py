"""The engine's worker thread: requests from many HTTP handlers share batches of one `Engine`.

    batcher = Batcher(engine, max_batch_size=8, max_queue=64)
    batcher.start()
    batcher.submit([Job(request, choice=0, sink=sink)])   # raises QueueFull when the queue is full
    # sink(choice, TokenEvent | EngineFailure | DONE) is called from the worker thread

The `Engine` is not thread-safe, so one thread owns it. It takes whatever is queued (up to
`max_batch_size` rows, after waiting `batch_wait_s` for stragglers when the queue holds fewer) and runs
them as one `stream_batch` call: static batching, every row of a batch starts together; rows that arrive
meanwhile wait for the next batch. A row whose `cancelled` event is set (client gone, timeout) stops at the
engine's next step. The queue is bounded: a full one refuses new work at once rather than letting latency
grow without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
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


class Batcher:
    def __init__(
        self, engine: Any, *, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()
        self.busy_rows = 0  # rows in the running batch (for /health)

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
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
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
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[Job]) -> None:
        self.busy_rows = len(batch)
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        started = False
        try:
            for events in self.engine.stream_batch([job.request for job in batch]):
                started = True
                for ev in events:
                    job = batch[ev.index]
                    self.stats.tokens += ev.token_id is not None
                    self.stats.cancelled += ev.finish_reason == "cancelled"
                    job.sink(job.choice, ev)
                    if ev.finish_reason is not None:
                        job.finished = True
                        job.sink(job.choice, DONE)
        except Exception as e:  # a broken batch must not take the server down: fail its rows, keep serving
            self.stats.failures += 1
            log.error("engine failed on a batch of %d rows: %s: %s", len(batch), type(e).__name__, e)
            if not started and len(batch) > 1:
                # Nothing was sent yet: run the rows one by one, so one bad row fails only itself.
                self.busy_rows = 0
                for job in batch:
                    self._run_batch([job])
                return
            for job in batch:
                if not job.finished:
                    job.sink(job.choice, EngineFailure(f"generation failed ({type(e).__name__})"))
                    job.finished = True
                    job.sink(job.choice, DONE)
        finally:
            self.busy_rows = 0
            for job in batch:
                if not job.finished:  # the engine ended without a finish event: still tell the waiter
                    self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        self.stats.cancelled += reason == "cancelled"
        job.sink(job.choice, TokenEvent(0, None, "", reason))
        job.finished = True
        job.sink(job.choice, DONE)
