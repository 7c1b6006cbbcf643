"""The server's audit records: start, stop and one record per request, in the same hash-chained log as
commands (`lmforge.audit`, $LMFORGE_AUDIT_LOG; off when it is unset).

    serve.start    resolved config hash, model (manifest hash), bind address, key fingerprints
    serve.request  method, route, status, key fingerprint, client address, token counts, ms, and for a
                   refusal (status >= 400) its reason: the error's type, code, param and message
                   (successful /health probes are not recorded)
    serve.stop     requests answered and refused since start

Records never hold a prompt, an output or a key: a key is its fingerprint (`serve.auth.fingerprint`), and a
refusal's reason is the server's own error message (they name fields and limits, not content).

The request path only puts a small dict on a queue (microseconds); one writer thread appends whatever has
queued under one lock and one fsync (`audit.write_records`), so a burst of requests costs one fsync, not one
each. The queue is bounded: when the disk cannot keep up, records beyond it are counted and the count is
written as a `serve.audit_dropped` record as soon as there is room, so a gap is itself on the chain.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
from pathlib import Path
from typing import Any

from lmforge import audit

MAX_PENDING = 10_000  # records waiting for the writer; beyond this they are counted, not queued
MAX_REASON = 200  # characters of a refusal's message kept


def config_hash(cfg: Any) -> str:
    """SHA-256 of the resolved config as canonical JSON (the same config always gives the same hash)."""
    return hashlib.sha256(audit.canonical(json.loads(cfg.model_dump_json()))).hexdigest()


def refusal_reason(body: bytes) -> dict[str, Any]:
    """type/code/param/message of an OpenAI-style error body, or {} when it is not one."""
    try:
        err = json.loads(body)["error"]
        assert isinstance(err, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return {}
    out = {k: err.get(k) for k in ("type", "code", "param") if err.get(k) is not None}
    if isinstance(err.get("message"), str):
        out["message"] = err["message"][:MAX_REASON]
    return out


class ServerAudit:
    """Queue server events for the audit log; a writer thread appends them. A no-op without a log."""

    def __init__(self, log: Path | None = None) -> None:
        self.log = log if log is not None else audit.log_path()
        self.answered = self.refused = self.dropped = 0
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._key: Any = None
        self._warned = False
        if self.log is None:
            return
        try:
            self._key = audit.signing_key()
        except Exception as e:  # like audit.append: a broken audit setup is a warning, not a dead server
            self._warn(e)
            self.log = None
            return
        self._thread = threading.Thread(target=self._run, name="lmforge-audit", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.log is not None

    def event(self, event: str, data: dict[str, Any]) -> None:
        """Queue one record (never blocks, never raises)."""
        if self.log is None:
            return
        try:
            self._queue.put_nowait((event, data))
        except queue.Full:
            self.dropped += 1

    def request(self, data: dict[str, Any]) -> None:
        if data.get("status", 0) >= 400:
            self.refused += 1
        else:
            self.answered += 1
        self.event("serve.request", data)

    def close(self, stop: dict[str, Any]) -> None:
        """Write the stop record, flush everything queued and end the writer."""
        if self.log is None or self._thread is None:
            return
        self.event("serve.stop", {**stop, "answered": self.answered, "refused": self.refused})
        self._queue.put(None)  # blocks only if full: the writer is draining it
        self._thread.join(30)
        self._thread = None

    def _warn(self, e: Exception) -> None:
        if not self._warned:  # once: a full disk must not flood stderr with one line per request
            print(f"warning: audit log {self.log}: not written ({e})", file=sys.stderr)
            self._warned = True

    def _run(self) -> None:
        assert self.log is not None
        done = False
        while not done:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            events = [item for item in batch if item is not None]
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                events.append(("serve.audit_dropped", {"records": dropped, "max_pending": MAX_PENDING}))
            try:
                audit.write_records(self.log, events, self._key)
            except Exception as e:  # never raises into the server
                self._warn(e)


__all__ = ["MAX_PENDING", "ServerAudit", "config_hash", "refusal_reason"]
