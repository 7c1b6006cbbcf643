"""`lmforge serve`: an OpenAI-compatible HTTP API and a chat page over one model, with keys and limits.

    lmforge serve runs/demo/pretrain                          # http://127.0.0.1:8000, chat page at /
    LMFORGE_API_KEYS=$(cat keys) lmforge serve runs/demo/pretrain host=0.0.0.0 requests_per_minute=30

Routes: `GET /health` (no key), `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(`stream: true` for server-sent events), `GET /` (the chat page). Any OpenAI client works:
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`.

What a request goes through, in order (each refusal is an OpenAI-style `{"error": {...}}`):

    key (401) -> body size (413) -> JSON + schema (400) -> prompt tokens, max_tokens cap, n cap, context (400)
      -> per-key requests/min and tokens/min (429 + Retry-After) -> bounded queue (503 + Retry-After)
      -> the engine's worker thread (batches of queued requests) -> response / SSE stream
      -> timeout or client gone: the row is cancelled at the engine's next step

Logs name the method, route, status, latency, token counts and a key fingerprint; never a prompt, an output
or a key (unless `log_prompts=true`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.config import Section, parse_command
from lmforge.errors import ConfigError
from lmforge.model.source import load_model
from lmforge.serve.auth import check_bind, fingerprint, load_keys, match_key
from lmforge.serve.batcher import DONE, Batcher, EngineFailure, Job, QueueFull
from lmforge.serve.filters import OutputFilter
from lmforge.serve.limits import BodyTooLarge, RateLimited, RateLimiter, TooLarge, read_capped

try:  # module level: FastAPI resolves the routes' `request: Request` annotations in this module's globals
    from starlette.requests import Request
except ImportError:  # pragma: no cover - `lmforge serve --help` still works without the serve extra
    Request = Any  # type: ignore[misc,assignment]

log = logging.getLogger("lmforge.serve")


class ServeConfig(Section):
    model: str = Field(
        description="model to serve: HF folder, lmforge run dir, model folder or checkpoint dir"
    )
    host: str = Field("127.0.0.1", description="address to bind; a non-loopback one requires API keys")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model_name: str | None = Field(None, description="model id in the API (default: the folder's name)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    compile: bool = Field(False, description="torch.compile the model's forward (slow first request)")
    threads: int = Field(
        0, ge=0, description="torch CPU threads (0 = torch's default; 1 is best on a busy machine)"
    )
    api_keys_env: str = Field("LMFORGE_API_KEYS", description="env var holding comma-separated API keys")
    api_keys_file: str | None = Field(None, description="file with one API key per line (# comments)")
    max_batch_size: int = Field(8, ge=1, description="most requests decoded together in one batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests to join")
    max_running_batches: int = Field(
        4, ge=1, description="batches decoded in turn, so new requests need not wait (1 = static batching)"
    )
    interleave_min_steps: int = Field(
        64, ge=0, description="start a batch beside running ones only if they have more steps than this to go"
    )
    max_queue: int = Field(64, ge=1, description="most requests waiting for the engine; more get 503")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt (default: the model's context)"
    )
    max_tokens_cap: int = Field(
        1024, ge=1, description="largest max_tokens a request may ask for (400 beyond)"
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not set it")
    max_n: int = Field(4, ge=1, description="most choices per request (n x prompts)")
    requests_per_minute: int = Field(120, ge=0, description="per-key request limit (0 = none)")
    tokens_per_minute: int = Field(
        200_000, ge=0, description="per-key prompt + generated tokens limit (0 = none)"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request still running after this is cancelled"
    )
    output_wordlist: str | None = Field(None, description="file of words that end an answer (content_filter)")
    log_prompts: bool = Field(False, description="log prompt text (off: logs never hold prompts or outputs)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="server log level")


CONFIG = ServeConfig


# ---------------------------------------------------------------------------------------------------------
# Request schemas: what the OpenAI API accepts and we support. Unknown fields are ignored (clients send
# many optional ones); fields we cannot honour (logprobs, tools, echo) are refused rather than ignored.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)  # accepted for compatibility, not applied
    frequency_penalty: float = Field(0.0, ge=-2, le=2)  # accepted for compatibility, not applied
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class _TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None


class ApiError(Exception):
    """A refusal with its HTTP status, answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> Any:
        from starlette.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or None
    return f"{loc or 'body'}: {err['msg']}", loc


# ---------------------------------------------------------------------------------------------------------


class ServerState:
    """Everything the routes share: engine worker, tokenizer, limits, filter. One per app."""

    def __init__(self, engine: Any, tokenizer: Any, cfg: ServeConfig, keys: list[str]) -> None:
        self.engine, self.tok, self.cfg, self.keys = engine, tokenizer, cfg, keys
        self.model_id = cfg.model_name or Path(cfg.model).name or "lmforge"
        self.context = int(getattr(engine, "max_seq_len", 0) or engine.model.cfg.max_seq_len)
        self.vocab = int(engine.model.cfg.vocab_size)
        self.max_prompt = min(cfg.max_prompt_tokens or self.context, self.context - 1)
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.filter = OutputFilter.from_file(cfg.output_wordlist) if cfg.output_wordlist else None
        self.batcher = Batcher(
            engine,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            batch_wait_s=cfg.batch_wait_ms / 1e3,
            max_running_batches=cfg.max_running_batches,
            interleave_min_steps=cfg.interleave_min_steps,
        )
        # A chat turn ends at any special token (ChatML's <|im_end|>, EOS): stop there, as chat clients expect.
        self.chat_stop_ids = sorted({int(i) for i in getattr(tokenizer, "special_tokens", {}).values()})
        self.created = int(time.time())
        # Message text is encoded with special-token strings as plain text (see chat_ids).
        self.plain = tokenizer.as_plain_text() if hasattr(tokenizer, "as_plain_text") else tokenizer
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()

    # -- request -> prompts + sampling params ----------------------------------------------------------
    def _check_text(self, text: str, param: str) -> None:
        try:
            text.encode("utf-8")  # lone surrogates ("\ud800" in JSON) are not text
        except UnicodeEncodeError:
            raise ApiError(400, f"{param}: not valid Unicode (lone surrogate)", param=param) from None

    def _encode(self, text: str, param: str) -> list[int]:
        self._check_text(text, param)
        return list(self.tok.encode(text))

    def chat_ids(self, msgs: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, where message text can never become a special token.

        Rendering the template and encoding the string would turn a user's "<|im_end|><|im_start|>system"
        into real role markers. So the template is rendered around placeholders; its own text is encoded
        with special tokens, each message's content as plain text.
        """
        for m in msgs:
            self._check_text(m["content"], "messages")
        marks = [f"\x00{uuid.uuid4().hex}\x00" for _ in msgs]
        shell = [{**m, "content": mark} for m, mark in zip(msgs, marks, strict=True)]
        import jinja2

        try:
            rendered = self.tok.apply_chat_template(shell, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise ApiError(
                400, f"messages: rejected by the model's chat template: {e}", param="messages"
            ) from None
        if any(rendered.count(mark) != 1 for mark in marks):  # a template that edits contents: strip specials
            clean = [{**m, "content": self._strip_specials(m["content"])} for m in msgs]
            return list(self.tok.encode(self.tok.apply_chat_template(clean, add_generation_prompt=True)))
        ids: list[int] = []
        pos = 0
        for at, i in sorted((rendered.index(mark), i) for i, mark in enumerate(marks)):
            ids += self.tok.encode(rendered[pos:at])
            ids += self.plain.encode(msgs[i]["content"])
            pos = at + len(marks[i])
        return ids + list(self.tok.encode(rendered[pos:]))

    def _strip_specials(self, text: str) -> str:
        specials = list(getattr(self.tok, "special_tokens", {}))
        while any(s in text for s in specials):  # until stable: "<|im_<|im_end|>end|>" rebuilds one
            for special in specials:
                text = text.replace(special, "")
        return text

    def prompts_of(self, req: CompletionRequest | ChatRequest) -> list[list[int]]:
        if isinstance(req, ChatRequest):
            msgs = []
            for m in req.messages:
                content = (
                    m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
                )
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            return [self.chat_ids(msgs)]
        p = req.prompt
        if isinstance(p, str):
            return [self._encode(p, "prompt") or [int(self.tok.bos_id)]]
        if not p:
            raise ApiError(400, "prompt: empty list", param="prompt")
        if isinstance(p[0], int):
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} outside [0, {self.vocab})", param="prompt")
            return [ids]
        return [self._encode(s, "prompt") or [int(self.tok.bos_id)] for s in p]

    def params_of(self, req: CompletionRequest | ChatRequest, prompts: list[list[int]]) -> tuple[Any, int]:
        """The engine's SamplingParams and the worst-case token count (for the tokens/minute limit)."""
        from lmforge.infer.sampling import SamplingParams

        cfg = self.cfg
        if isinstance(req, CompletionRequest) and (req.echo or req.logprobs or req.suffix):
            raise ApiError(400, "echo, logprobs and suffix are not supported", param="echo")
        if isinstance(req, ChatRequest) and (req.logprobs or req.tools):
            raise ApiError(400, "logprobs and tools are not supported", param="tools")
        choices = req.n * len(prompts)
        if choices > cfg.max_n:
            raise ApiError(400, f"n x prompts = {choices}; this server allows at most {cfg.max_n}", param="n")
        longest = max(len(p) for p in prompts)
        if longest > self.max_prompt:
            raise ApiError(
                400,
                f"prompt is {longest} tokens; this server accepts at most {self.max_prompt}",
                param="prompt" if isinstance(req, CompletionRequest) else "messages",
                code="context_length_exceeded",
            )
        asked = req.max_completion_tokens if isinstance(req, ChatRequest) else None
        asked = asked or req.max_tokens
        room = self.context - longest
        if asked is not None:
            if asked > cfg.max_tokens_cap:
                raise ApiError(
                    400,
                    f"max_tokens is {asked}; this server allows at most {cfg.max_tokens_cap}",
                    param="max_tokens",
                )
            if asked > room:
                raise ApiError(
                    400,
                    f"prompt ({longest} tokens) + max_tokens ({asked}) exceeds the model's context of "
                    f"{self.context} tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = asked
        else:
            max_tokens = min(cfg.default_max_tokens, cfg.max_tokens_cap, room)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise ApiError(400, "stop: at most 4 non-empty strings of at most 256 characters", param="stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            stop=stop,
            stop_token_ids=[  # ignore_eos: the end-of-text token does not end a chat reply either
                i for i in self.chat_stop_ids if not (req.ignore_eos and i == self.tok.eos_id)
            ]
            if isinstance(req, ChatRequest)
            else [],
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        worst = sum(len(p) for p in prompts) + choices * max_tokens
        return params, worst


def _parse(
    body: bytes, schema: type[CompletionRequest] | type[ChatRequest]
) -> CompletionRequest | ChatRequest:
    try:
        obj = json.loads(body)  # bytes: UTF-8/16/32 detected; invalid UTF-8 raises UnicodeDecodeError
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise ApiError(400, message, param=param) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


class _Choice:
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


async def _generate(state: ServerState, request: Any, chat: bool) -> Any:
    from starlette.responses import JSONResponse

    from lmforge.infer.engine import GenerationRequest

    cfg = state.cfg
    started = time.monotonic()
    key_id = request.scope.get("lmforge.key") or f"ip:{request.client.host if request.client else '?'}"
    try:
        ticket = state.limiter.count(key_id)  # before reading or tokenizing anything
        body = await read_capped(request.stream(), cfg.max_body_bytes, request.headers.get("content-length"))
        req = _parse(body, ChatRequest if chat else CompletionRequest)
        prompts = state.prompts_of(req)
        params, worst = state.params_of(req, prompts)
        state.limiter.charge(ticket, worst)
    except RateLimited as e:
        raise ApiError(
            429, str(e), type="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}
        ) from None
    except TooLarge as e:
        raise ApiError(400, str(e), param="max_tokens") from None
    if cfg.log_prompts:
        log.info("prompt %s: %r", key_id, [state.tok.decode(p) for p in prompts])

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    def sink(choice: int, item: Any) -> None:  # called from the engine thread
        with contextlib.suppress(RuntimeError):  # loop closed (server shutting down): nobody is waiting
            loop.call_soon_threadsafe(inbox.put_nowait, (choice, item))

    choices: list[_Choice] = []
    jobs: list[Job] = []
    for p_i, ids in enumerate(prompts):
        for k in range(req.n):
            cancel = threading.Event()
            seed = None if params.seed is None else (params.seed + k) % 2**63  # n distinct samples
            row = GenerationRequest(ids, params.model_copy(update={"seed": seed}), cancel)
            index = p_i * req.n + k
            choices.append(_Choice(index, state.filter, cancel))
            jobs.append(Job(row, index, sink))
    try:
        state.batcher.submit(jobs)
    except QueueFull as e:
        state.limiter.settle(ticket, 0)
        raise ApiError(503, str(e), type="server_busy", headers={"Retry-After": "1"}) from None

    prompt_tokens = sum(len(p) for p in prompts)
    deadline = started + cfg.request_timeout_s
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

    def cancel_all() -> None:
        for c in choices:
            c.cancel.set()

    def usage() -> dict[str, int]:
        done = sum(c.tokens for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": done,
            "total_tokens": prompt_tokens + done,
        }

    def finish_request() -> None:
        cancel_all()  # a no-op for finished rows; stops the rest (client gone, timeout, error)
        u = usage()
        state.limiter.settle(ticket, u["prompt_tokens"] + u["completion_tokens"])
        request.scope["lmforge.usage"] = u

    async def next_item(poll: bool) -> tuple[int, Any] | None:
        """The next (choice, item), or None on timeout; a non-streaming waiter also watches the client."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(asyncio.QueueEmpty):
                return inbox.get_nowait()  # the common case under load: no timer, no task
            try:
                return await asyncio.wait_for(inbox.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if poll and await request.is_disconnected():
                    raise ClientGone() from None

    if not req.stream:
        failure = None
        try:
            while not all(c.done for c in choices):
                got = await next_item(poll=True)
                if got is None:
                    raise ApiError(
                        503, f"request timed out after {cfg.request_timeout_s:g} s", type="timeout"
                    )
                i, item = got
                c = choices[i]
                if item is DONE:
                    c.done = True
                elif isinstance(item, EngineFailure):
                    failure = item.message
                else:
                    c.take(item)
        finally:
            finish_request()
        if failure is not None:
            raise ApiError(503, failure, type="server_error")
        out = []
        for c in choices:
            text = "".join(c.parts)
            reason = c.finish if c.finish != "cancelled" else "length"
            if chat:
                out.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                )
            else:
                out.append({"index": c.index, "text": text, "finish_reason": reason, "logprobs": None})
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": state.model_id,
                "choices": out,
                "usage": usage(),
            }
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        data = {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [choice]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        if chat:
            for c in choices:
                yield chunk(c.index, None, None, role=True)
        while not all(c.done for c in choices):
            got = await next_item(poll=False)
            if got is None:
                err = {"message": f"request timed out after {cfg.request_timeout_s:g} s", "type": "timeout"}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            i, item = got
            c = choices[i]
            if item is DONE:
                c.done = True
            elif isinstance(item, EngineFailure):
                yield f"data: {json.dumps({'error': {'message': item.message, 'type': 'server_error'}})}\n\n"
            elif c.finish is None:  # after content_filter, the row's remaining events are dropped
                text = c.take(item)
                if c.finish == "cancelled":
                    c.finish = "length"
                if text or c.finish is not None:
                    yield chunk(c.index, text, c.finish)
        if include_usage:
            data = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": state.model_id,
                "choices": [],
                "usage": usage(),
            }
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    return _event_stream(events(), finish_request)


class ClientGone(Exception):
    """The client closed the connection while its request ran (logged as 499, nothing is sent)."""


def _event_stream_class() -> Any:
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """SSE whose `on_close` runs however the stream ends: done, client gone (cancelled), error."""

        def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
            super().__init__(
                content,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            self.on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()

    return EventStream


def _event_stream(content: AsyncIterator[str], on_close: Callable[[], None]) -> Any:
    return _event_stream_class()(content, on_close)


# ---------------------------------------------------------------------------------------------------------
# The edge: keys, error shape, logging; wraps every route, including unknown paths.

_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>lmforge: API key</title>
<form id="f" style="font:16px system-ui;margin:4em auto;max-width:24em">
<p>This server needs an API key.</p><input id="k" type="password" autocomplete="off" style="width:100%"
placeholder="API key"><p><button>Open the chat</button> <span id="e" style="color:#b00"></span></p></form>
<script>
document.getElementById('f').onsubmit = async (ev) => {
  ev.preventDefault();
  const key = document.getElementById('k').value;
  const r = await fetch('/', {headers: {Authorization: 'Bearer ' + key}});
  if (!r.ok) { document.getElementById('e').textContent = 'wrong key'; return; }
  sessionStorage.setItem('lmforge_key', key);
  const html = await r.text();
  document.open(); document.write(html); document.close();
};
</script>"""

_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'"


class Edge:
    """Pure ASGI middleware: API keys on every route but /health, JSON errors, one log line per request."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import HTMLResponse

        t0 = time.perf_counter()
        status = [0]

        async def send_logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope.get("path", "")
        keys = self.state.keys
        try:
            if keys and path != "/health":
                headers = Headers(scope=scope)
                key = match_key(headers.get("authorization"), keys)
                if key is None:
                    if (
                        path == "/"
                        and scope.get("method") == "GET"
                        and "text/html" in headers.get("accept", "")
                    ):
                        page = HTMLResponse(
                            _LOGIN_PAGE, status_code=401, headers={"Content-Security-Policy": _CSP}
                        )
                        await page(scope, receive, send_logged)
                    else:
                        err = ApiError(
                            401,
                            "missing or invalid API key (send `Authorization: Bearer <key>`)",
                            code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                        await err.response()(scope, receive, send_logged)
                    return
                scope["lmforge.key"] = fingerprint(key)
            await self.app(scope, receive, send_logged)
        except Exception as e:  # the last line of defence: a bug answers 500 JSON, the server lives on
            log.error("unhandled %s on %s %s: %s", type(e).__name__, scope.get("method"), path, e)
            if status[0] == 0:
                await ApiError(500, "internal error", type="server_error").response()(
                    scope, receive, send_logged
                )
        finally:
            u = scope.get("lmforge.usage") or {}
            log.info(
                "%s %s %d %.0fms %s prompt_tokens=%s completion_tokens=%s",
                scope.get("method"),
                path if len(path) <= 64 else path[:64] + "...",
                status[0] or 499,
                (time.perf_counter() - t0) * 1e3,
                scope.get("lmforge.key", "-"),
                u.get("prompt_tokens", "-"),
                u.get("completion_tokens", "-"),
            )


def create_app(engine: Any, tokenizer: Any, cfg: ServeConfig, keys: list[str] | None = None) -> Any:
    """The ASGI app over a ready `Engine`; starts the engine's worker thread (stopped at shutdown)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse

    state = ServerState(engine, tokenizer, cfg, list(keys or []))

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.lmforge = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Any:
        return e.response()

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge) -> Any:
        return ApiError(413, str(e), code="request_too_large").response()

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, e: ClientGone) -> Any:
        return JSONResponse(
            {"error": {"message": "client closed the request", "type": "cancelled"}}, status_code=499
        )

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

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": state.batcher.queued, "running": state.batcher.busy_rows}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lmforge"}
        return {"object": "list", "data": [{**card, "max_model_len": state.context}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != state.model_id:
            raise ApiError(
                404,
                f"model {model_id[:100]!r} not found; this server has {state.model_id!r}",
                type="not_found",
            )
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lmforge"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _generate(state, request, chat=True)

    page = resources.files("lmforge.serve").joinpath("static/index.html").read_text("utf-8")

    @app.get("/")
    async def index() -> Any:
        return HTMLResponse(page, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"})

    return Edge(app, state)


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 (port 0 = a free one): tests and benchmarks.

    with BackgroundServer(app) as srv:
        httpx.get(srv.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _positional_model(argv: list[str]) -> list[str]:
    """`lmforge serve PATH ...` is `lmforge serve model=PATH ...`."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("-c", "--config"):
            continue
        if i > 0 and out[i - 1] in ("-c", "--config"):
            continue
        if not a.startswith("-") and "=" not in a:
            out[i] = f"model={a}"
            break
    return out


def main(argv: list[str]) -> int:
    cfg = parse_command(
        _positional_model(argv),
        CONFIG,
        "serve",
        "Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, "
        "streaming over SSE) with a chat page at /. API keys come from $LMFORGE_API_KEYS or api_keys_file; "
        "binding beyond loopback requires them.",
        "lmforge serve runs/demo/pretrain port=8000 requests_per_minute=60",
    )
    keys = load_keys(cfg.api_keys_env, cfg.api_keys_file)
    check_bind(cfg.host, keys)
    if cfg.output_wordlist:
        OutputFilter.from_file(cfg.output_wordlist)  # fail before loading the model
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("lmforge serve needs the serve extra: pip install 'lmforge[serve]'") from None
    import torch

    from lmforge.infer.engine import Engine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tok = load_model(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    engine = Engine(model, tok, max_batch_size=cfg.max_batch_size, compile=cfg.compile)
    app = create_app(engine, tok, cfg, keys)
    where = "with API keys" if keys else "without API keys (loopback only)"
    log.info("serving %s on http://%s:%d %s", cfg.model, cfg.host, cfg.port, where)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    return 0
