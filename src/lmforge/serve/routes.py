"""The endpoints: /health, /v1/models, /v1/completions, /v1/chat/completions (JSON or SSE), /v1/embeddings
(serve.embeddings), /v1/feedback (serve.feedback; 404 unless feedback.enabled), the chat page.

A completion request goes through `admit` (rate limit, body cap, schema, prompts, sampling, token
budget), then a `Generation` puts its choices on the engine's worker and gathers their events, into
one JSON body or an event stream. A timeout, the client leaving or an engine failure cancels its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lmforge.infer.engine import GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.batcher import DONE, EngineFailure, Job, QueueFull
from lmforge.serve.edge import chat_page, log, page_headers
from lmforge.serve.embeddings import embeddings
from lmforge.serve.feedback import feedback_record, parse_feedback
from lmforge.serve.filters import OutputFilter
from lmforge.serve.limits import BodyTimeout, BodyTooLarge, RateLimited, TooLarge
from lmforge.serve.protocol import (
    ApiError,
    ApiRequest,
    ChatRequest,
    ClientGone,
    CompletionRequest,
    choice_body,
    delta_body,
    parse_request,
    sse,
    stream_error,
)
from lmforge.serve.state import ServerState, check_format

try:  # module level: FastAPI resolves the routes' `request: Request` annotations in this module's globals
    from starlette.requests import Request
except ImportError:  # pragma: no cover - `lmforge serve --help` still works without the serve extra
    Request = Any  # type: ignore[misc,assignment]


class Choice:
    """One choice's text, token count and finish reason as events arrive."""

    def __init__(self, index: int, f: OutputFilter | None, cancel: threading.Event) -> None:
        self.index, self.cancel = index, cancel
        self.parts: list[str] = []
        self.tokens = 0
        self.finish: str | None = None
        self.stream_filter = f.stream() if f is not None else None
        self.done = False

    def take(self, ev: Any) -> str:
        """Apply one TokenEvent; the text that may be sent now."""
        if ev.token_id is not None:
            self.tokens += 1
        text = ev.text
        if self.stream_filter is not None:
            text = self.stream_filter.feed(text)
            if ev.finish_reason is not None:
                text += self.stream_filter.flush()
            if self.stream_filter.blocked:
                self.cancel.set()  # the engine stops this row at its next step
                self.finish = "content_filter"
        if ev.finish_reason is not None and self.finish is None:
            self.finish = ev.finish_reason
        self.parts.append(text)
        return text


@dataclass
class Admitted:
    """A request that passed every check and was charged its worst-case tokens."""

    req: ApiRequest
    prompts: list[list[int]]
    params: SamplingParams
    ticket: Any  # the rate limiter's, settled with the real token count at the end
    started: float


async def admit(state: ServerState, request: Any, chat: bool) -> Admitted:
    """Rate limit (before reading or tokenizing anything), body cap, JSON content type, schema, counts and
    sizes, prompts (tokenized in a thread), sampling, budget."""
    started = time.monotonic()
    try:
        key_id, ticket, body = await state.admit_body(request)
        req: ApiRequest = parse_request(body, ChatRequest) if chat else parse_request(body, CompletionRequest)
        state.check_shape(req)  # counts and sizes before any tokenization
        if check_format(req):
            await asyncio.to_thread(state.json_vocab)  # a large vocabulary's first pass: not on the loop
        prompts = await asyncio.to_thread(state.prompts_of, req)  # off the event loop: /health stays quick
        params, worst = state.params_of(req, prompts)
        state.limiter.charge(ticket, worst)
    except RateLimited as e:
        raise ApiError(
            429, str(e), type="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}
        ) from None
    except TooLarge as e:
        raise ApiError(400, str(e), param="max_tokens") from None
    if state.cfg.log_prompts:
        log.info("prompt %s: %r", key_id, [state.tok.decode(p) for p in prompts])
    return Admitted(req, prompts, params, ticket, started)


class Generation:
    """One admitted request on the engine: n choices per prompt, their events, usage, the deadline."""

    def __init__(self, state: ServerState, request: Any, got: Admitted, chat: bool) -> None:
        self.state, self.request, self.got, self.chat = state, request, got, chat
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = sum(len(p) for p in got.prompts)
        self.deadline = got.started + state.cfg.request_timeout_s
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _sink(self, choice: int, item: Any) -> None:  # called from the engine thread
        with contextlib.suppress(RuntimeError):  # loop closed (server shutting down): nobody is waiting
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, (choice, item))

    def submit(self) -> None:
        """Queue every choice on the engine's worker (503 + Retry-After when the queue is full)."""
        got, jobs = self.got, []
        for p_i, ids in enumerate(got.prompts):
            for k in range(got.req.n):
                cancel = threading.Event()
                seed = (
                    None if got.params.seed is None else (got.params.seed + k) % 2**63
                )  # n distinct samples
                params = got.params.model_copy(update={"seed": seed})
                hook = self.state.logits_hook(got.req, params)
                row = GenerationRequest(ids, params, cancel, logits_hook=hook)
                index = p_i * got.req.n + k
                self.choices.append(Choice(index, self.state.filter, cancel))
                jobs.append(Job(row, index, self._sink))
        try:
            self.state.batcher.submit(jobs)
        except QueueFull as e:
            self.state.limiter.settle(got.ticket, 0)
            raise ApiError(503, str(e), type="server_busy", headers={"Retry-After": "1"}) from None

    def usage(self) -> dict[str, int]:
        done = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def finish(self) -> None:
        """Stop the rows still running (client gone, timeout, error), settle the rate limit, log usage."""
        for c in self.choices:
            c.cancel.set()  # a no-op for finished rows
        u = self.usage()
        self.state.limiter.settle(self.got.ticket, u["prompt_tokens"] + u["completion_tokens"])
        self.request.scope["lmforge.usage"] = u

    def timeout_message(self) -> str:
        return f"request timed out after {self.state.cfg.request_timeout_s:g} s"

    async def next_item(self, poll: bool) -> tuple[int, Any] | None:
        """The next (choice, item), or None on timeout; a non-streaming waiter also watches the client."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(asyncio.QueueEmpty):
                return self.inbox.get_nowait()  # the common case under load: no timer, no task
            try:
                return await asyncio.wait_for(self.inbox.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if poll and await self.request.is_disconnected():
                    raise ClientGone() from None

    async def complete(self) -> dict[str, Any]:
        """Wait for every choice; the whole completion as one JSON body."""
        failure = None
        try:
            while not all(c.done for c in self.choices):
                got = await self.next_item(poll=True)
                if got is None:
                    raise ApiError(503, self.timeout_message(), type="timeout")
                i, item = got
                if item is DONE:
                    self.choices[i].done = True
                elif isinstance(item, EngineFailure):
                    failure = item.message
                else:
                    self.choices[i].take(item)
        finally:
            self.finish()
        if failure is not None:
            raise ApiError(503, failure, type="server_error")
        out = [
            choice_body(
                self.chat, c.index, "".join(c.parts), c.finish if c.finish != "cancelled" else "length"
            )
            for c in self.choices
        ]
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.state.model_id,
            "choices": out,
            "usage": self.usage(),
        }

    def _event(self, created: int, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.rid,
            "object": obj,
            "created": created,
            "model": self.state.model_id,
            "choices": choices,
            **extra,
        }

    async def events(self) -> AsyncIterator[str]:
        """The completion as server-sent events, chunk by chunk, then [DONE]."""
        created = int(time.time())

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            return sse(self._event(created, [delta_body(self.chat, index, text, reason, role)]))

        if self.chat:
            for c in self.choices:
                yield chunk(c.index, None, None, role=True)
        while not all(c.done for c in self.choices):
            got = await self.next_item(poll=False)
            if got is None:
                yield stream_error(self.timeout_message(), "timeout")
                break
            i, item = got
            c = self.choices[i]
            if item is DONE:
                c.done = True
            elif isinstance(item, EngineFailure):
                yield stream_error(item.message, "server_error")
            elif c.finish is None:  # after content_filter, the row's remaining events are dropped
                text = c.take(item)
                if c.finish == "cancelled":
                    c.finish = "length"
                if text or c.finish is not None:
                    yield chunk(c.index, text, c.finish)
        req = self.got.req
        if req.stream_options and req.stream_options.include_usage:
            yield sse(self._event(created, [], usage=self.usage()), ensure_ascii=True)
        yield "data: [DONE]\n\n"


def event_stream(content: AsyncIterator[str], on_close: Callable[[], None]) -> Any:
    """SSE whose `on_close` runs however the stream ends: done, client gone (cancelled), error."""
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                on_close()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()

    return EventStream(
        content,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def generate(state: ServerState, request: Any, chat: bool) -> Any:
    """POST /v1/completions and /v1/chat/completions: admit, queue, answer as JSON or SSE."""
    from starlette.responses import JSONResponse

    gen = Generation(state, request, await admit(state, request, chat), chat)
    gen.submit()
    if not gen.got.req.stream:
        return JSONResponse(await gen.complete())
    return event_stream(gen.events(), gen.finish)


async def feedback(state: ServerState, request: Any) -> dict[str, Any]:
    """POST /v1/feedback: one rating or comparison, on disk (fsynced) before the answer."""
    if state.feedback is None:
        raise ApiError(
            404,
            "feedback is off on this server (start it with feedback.enabled=true)",
            type="not_found",
            code="feedback_disabled",
        )
    try:
        _, _, body = await state.admit_body(request)
    except RateLimited as e:
        raise ApiError(
            429, str(e), type="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}
        ) from None
    fb = parse_feedback(body, state.cfg.feedback)
    state.check_model(fb.model)
    record = feedback_record(fb, state.model_id, request.scope.get("lmforge.key"))
    try:
        await asyncio.to_thread(state.feedback.append, record)
    except OSError as e:  # a full or failing disk: say it was not recorded, the server lives on
        log.error("feedback log %s: not written (%s)", state.feedback.path, e.strerror)
        raise ApiError(503, "feedback could not be recorded; try again later", type="server_error") from None
    return {"object": "feedback", "id": record["id"], "recorded": True}


def add_error_handlers(app: Any) -> None:
    """Every error, ours or the framework's, answered in OpenAI's error shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Any:
        return e.response()

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge) -> Any:
        return ApiError(413, str(e), code="request_too_large").response()

    @app.exception_handler(BodyTimeout)
    async def _slow_body(_: Request, e: BodyTimeout) -> Any:
        return ApiError(408, str(e), type="timeout", headers={"Connection": "close"}).response()

    async def _gone(_: Request, e: Exception) -> Any:
        return JSONResponse(
            {"error": {"message": "client closed the request", "type": "cancelled"}}, status_code=499
        )

    app.add_exception_handler(ClientGone, _gone)
    app.add_exception_handler(ClientDisconnect, _gone)  # the client left while its body was being read

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> Any:
        return ApiError(
            e.status_code,
            str(e.detail),
            type="not_found" if e.status_code == 404 else "invalid_request_error",
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Any:
        return ApiError(400, "invalid request").response()


def add_routes(app: Any, state: ServerState) -> None:
    from starlette.responses import HTMLResponse

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": state.batcher.queued, "running": state.batcher.busy_rows}

    def card() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lmforge"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{**card(), "max_model_len": state.context}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        state.check_model(model_id)
        return card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(state, request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings_route(request: Request) -> Any:
        return await embeddings(state, request)

    @app.post("/v1/feedback")
    async def feedback_route(request: Request) -> Any:
        return await feedback(state, request)

    page = chat_page(feedback=state.feedback is not None)

    @app.get("/")
    async def index() -> Any:
        return HTMLResponse(page, headers=page_headers())


__all__ = [
    "Admitted",
    "Choice",
    "Generation",
    "add_error_handlers",
    "add_routes",
    "admit",
    "event_stream",
    "feedback",
    "generate",
]
