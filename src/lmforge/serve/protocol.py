"""The OpenAI wire protocol as `lmforge serve` speaks it: request schemas, error bodies, response bodies.

What the OpenAI API accepts and we support. Unknown fields are ignored (clients send many optional ones);
fields we cannot honour (logprobs, tools, echo) are refused rather than ignored (see `serve.state`).
Every refusal is an `ApiError`, answered as OpenAI's `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


# Where the sampling math (infer.sampling) is defined for every weight dtype; outside: 400 naming the field.
# temperature: logits / T after a max shift; below MIN_TEMPERATURE it is argmax anyway (send 0: greedy).
# repetition_penalty: seen tokens' positive logits / p; below 0.1, fp16 logits can overflow to inf and
# the draw sees inf - inf = NaN (1e-300 rounds to 0 in fp32: a division by zero).
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.1


class ResponseFormat(_Lenient):
    type: str  # "text", "json_object" (honoured) or "json_schema" (refused): serve.state.check_format
    json_schema: Any = None


class SamplingFields(_Lenient):
    model: str | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 or [MIN_TEMPERATURE, 2]
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 or >= the vocabulary = off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)  # accepted for compatibility, not applied
    frequency_penalty: float = Field(0.0, ge=-2, le=2)  # accepted for compatibility, not applied
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_positive(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return v


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None


ApiRequest = CompletionRequest | ChatRequest


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection while its request ran (logged as 499, nothing is sent)."""


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or None
    return f"{loc or 'body'}: {err['msg']}", loc


class EmbeddingRequest(_Lenient):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


Schema = TypeVar("Schema", bound=BaseModel)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 ApiError saying what is wrong."""
    try:
        obj = json.loads(body)  # bytes: UTF-8/16/32 detected; invalid UTF-8 raises UnicodeDecodeError
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object")
    return obj


def parse_request(body: bytes, schema: type[Schema]) -> Schema:
    """A request body as its schema, or a 400 ApiError saying what is wrong."""
    obj = json_object(body)
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        message, param = validation_message(e)
        raise ApiError(400, message, param=param) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


def check_text(text: str, param: str) -> None:
    """400 naming `param` for text that is not valid Unicode (a lone surrogate, "\\ud800" in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param}: not valid Unicode (lone surrogate)", param=param) from None


def sse(data: Any, ensure_ascii: bool = False) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=ensure_ascii)}\n\n"


def stream_error(message: str, type: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type}})}\n\n"


def choice_body(chat: bool, index: int, text: str, reason: str | None) -> dict[str, Any]:
    """One choice of a non-streamed completion (chat: a message; text completion: the text)."""
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}


def delta_body(chat: bool, index: int, text: str | None, reason: str | None, role: bool) -> dict[str, Any]:
    """One choice of a streamed chunk; a chat stream opens each choice with the assistant role."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}


__all__ = [
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "ApiError",
    "ApiRequest",
    "ChatMessage",
    "ChatRequest",
    "ClientGone",
    "CompletionRequest",
    "EmbeddingRequest",
    "ResponseFormat",
    "SamplingFields",
    "StreamOptions",
    "TextPart",
    "check_text",
    "choice_body",
    "delta_body",
    "parse_request",
    "sse",
    "stream_error",
    "validation_message",
]
