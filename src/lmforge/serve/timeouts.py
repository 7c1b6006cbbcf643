"""Read timeouts for `lmforge serve`: slow or stalled clients lose their connection, not the server's sockets.

uvicorn times out idle keep-alive connections but never a request still arriving: a client that sends
half a request head, or a head and half its body, holds its connection (and a file descriptor) forever.
`timed_h11(header_s, body_s)` is uvicorn's h11 protocol with two deadlines:

- the head: a new connection, or bytes of a next request on a kept-alive one, must complete a request
  head within `header_s`, else the connection is closed;
- the body: a route reading it waits at most `body_s` for it (the edge answers 408, see `serve.edge`);
  when the answer went out before the body was in (a GET with a body, a request refused before its
  body was read), the rest must arrive within `body_s` of the answer, else the connection is closed.

    uvicorn.run(app, http=timed_h11(10.0, 30.0))
"""

from __future__ import annotations

import asyncio
from typing import Any


def timed_h11(header_s: float, body_s: float) -> type[asyncio.Protocol]:
    """uvicorn's H11Protocol with a request-head deadline and a request-body deadline (seconds)."""
    from uvicorn.protocols.http import h11_impl
    from uvicorn.protocols.http.h11_impl import H11Protocol

    h11 = h11_impl.h11  # the h11 uvicorn runs on (its states: IDLE, SEND_BODY, ...)

    class TimedH11Protocol(H11Protocol):
        timer: asyncio.TimerHandle | None = None
        phase: str = ""  # what the timer waits for: "head", "body" or "" (nothing)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.watch("head")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watch(self.waiting_for())

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer for an idle connection
            # The rest of a body the route did not read, or a pipelined partial head, is still timed.
            self.watch("body" if self.conn.their_state is h11.SEND_BODY else self.waiting_for())

        def connection_lost(self, exc: Exception | None) -> None:
            self.watch("")
            super().connection_lost(exc)

        def waiting_for(self) -> str:
            """What of the client's current request is still missing."""
            state = self.conn.their_state
            if state is h11.IDLE:  # a partial head is buffered (an idle connection is keep-alive's)
                return "head" if self.conn.trailing_data[0] else self.phase
            # A body still arriving while a route reads it is the edge's to time out (it answers 408).
            return "body" if state is h11.SEND_BODY and self.phase == "body" else ""

        def watch(self, phase: str) -> None:
            if phase == self.phase:
                return
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.phase = phase
            if phase and not self.transport.is_closing():
                self.timer = self.loop.call_later(header_s if phase == "head" else body_s, self.expire)

        def expire(self) -> None:
            self.timer, self.phase = None, ""
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


__all__ = ["timed_h11"]
