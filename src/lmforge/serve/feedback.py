"""Human feedback on served answers: the `feedback:` config, the request schema of `POST /v1/feedback`,
and the append-only log each event is written to.

A request is one event, validated strictly (unknown fields, wrong types and coercions are refused with a
400 naming the field):

    {"kind": "rating", "messages": [{"role": "user", "content": "Hi"}], "answer": "Hello", "rating": "up"}
    {"kind": "comparison", "prompt": "2+3=", "answers": ["5", "6"], "choice": 0}

with exactly one of `prompt` (text) or `messages` (a chat, not ending with the assistant's turn), and
optionally `model` (404 unless it is the served model) and `request_id` (e.g. the completion's id).

The log is JSON lines, one record per event, appended with one `os.write` on an O_APPEND descriptor and
`os.fsync` under one lock before the request is answered: an acknowledged event survives a kill -9 or a
power cut, and concurrent events never interleave. A record holds the exact prompt and answer(s), the
served model id, the time and the caller's key fingerprint (`serve.auth.fingerprint`), never a key.
`lmforge data feedback` turns the log into preference pairs (docs/feedback.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.config import ConfigPath, Section
from lmforge.crypt import fsync_dir
from lmforge.errors import ConfigError
from lmforge.serve.protocol import ApiError, check_text, json_object, validation_message

KINDS = ("rating", "comparison")


class FeedbackConfig(Section):
    enabled: bool = Field(
        False, description="accept POST /v1/feedback and show ratings and comparisons on the chat page"
    )
    path: ConfigPath = Field(
        "feedback.jsonl", description="JSONL file the events are appended to (created 0600)"
    )
    max_chars: int = Field(
        100_000, ge=1, description="longest prompt, message or answer text accepted (400 beyond)"
    )
    max_messages: int = Field(256, ge=1, description="most messages in one event's conversation (400 beyond)")


class _Strict(BaseModel):
    # strict: "1" is not a choice and true is not 1; forbid: a misspelt field is an error, not dropped.
    model_config = ConfigDict(extra="forbid", strict=True)


class FeedbackMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class _Event(_Strict):
    model: str | None = None
    request_id: str | None = Field(None, min_length=1, max_length=200)
    prompt: str | None = Field(None, min_length=1)
    messages: list[FeedbackMessage] | None = Field(None, min_length=1)


class Rating(_Event):
    kind: Literal["rating"]
    answer: str = Field(min_length=1)
    rating: Literal["up", "down"]


class Comparison(_Event):
    kind: Literal["comparison"]
    answers: list[str] = Field(min_length=2, max_length=2)
    choice: int = Field(ge=0, le=1)


Feedback = Rating | Comparison


def _texts(fb: Feedback) -> list[tuple[str, str]]:
    """(field, text) of every text the event carries, for the size and Unicode checks."""
    out = [("prompt", fb.prompt)] if fb.prompt is not None else []
    out += [(f"messages[{i}].content", m.content) for i, m in enumerate(fb.messages or [])]
    if isinstance(fb, Rating):
        return [*out, ("answer", fb.answer)]
    return out + [(f"answers[{i}]", a) for i, a in enumerate(fb.answers)]


def _check(fb: Feedback, cfg: FeedbackConfig) -> None:
    if (fb.prompt is None) == (fb.messages is None):
        raise ApiError(400, "prompt: give exactly one of prompt (text) or messages (a chat)", param="prompt")
    if fb.messages is not None:
        if len(fb.messages) > cfg.max_messages:
            raise ApiError(
                400, f"messages: {len(fb.messages)}; at most {cfg.max_messages} accepted", param="messages"
            )
        if fb.messages[-1].role == "assistant":
            raise ApiError(
                400,
                "messages: the last message is the assistant's; the rated reply goes in answer(s)",
                param="messages",
            )
    for field, text in _texts(fb):
        check_text(text, field)
        if len(text) > cfg.max_chars:
            raise ApiError(
                400, f"{field}: {len(text)} characters; at most {cfg.max_chars} accepted", param=field
            )
    if isinstance(fb, Comparison):
        if not all(fb.answers):
            raise ApiError(400, "answers: both answers must be non-empty", param="answers")
        if fb.answers[0] == fb.answers[1]:
            raise ApiError(
                400, "answers: the two answers are identical (nothing to compare)", param="answers"
            )


def parse_feedback(body: bytes, cfg: FeedbackConfig) -> Feedback:
    """A request body as a rating or a comparison, or a 400 ApiError naming the field."""
    obj = json_object(body)
    kind = obj.get("kind")
    if kind not in KINDS:
        # The message names the field, never echoes the value: refusal reasons go to the audit log.
        raise ApiError(400, "kind: expected 'rating' or 'comparison'", param="kind")
    schema: type[Rating] | type[Comparison] = Rating if kind == "rating" else Comparison
    try:
        fb = schema.model_validate(obj)
    except ValidationError as e:
        message, param = validation_message(e)
        raise ApiError(400, message, param=param) from None
    _check(fb, cfg)
    return fb


def feedback_record(fb: Feedback, model_id: str, key: str | None) -> dict[str, Any]:
    """The line written for one event: exact texts, the served model, UTC time, the key's fingerprint."""
    now = time.time()
    rec: dict[str, Any] = {
        "id": "fb-" + uuid.uuid4().hex,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "kind": fb.kind,
        "model": model_id,
        "request_id": fb.request_id,
        "key": key,
    }
    if fb.prompt is not None:
        rec["prompt"] = fb.prompt
    else:
        rec["messages"] = [m.model_dump() for m in fb.messages or []]
    if isinstance(fb, Rating):
        rec.update(answer=fb.answer, rating=fb.rating)
    else:
        rec.update(answers=list(fb.answers), choice=fb.choice)
    return rec


class FeedbackLog:
    """The append-only JSONL log: one write + fsync per record, under one lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError(
                f"feedback.path {self.path}: cannot open for appending ({e.strerror})"
            ) from None
        if new:
            fsync_dir(self.path.parent)  # the file's entry, so its first records are not orphaned
        # A line torn by a crash in the middle of a write must not swallow the next record.
        self._torn = self._ends_torn()

    def _ends_torn(self) -> bool:
        size = os.fstat(self._fd).st_size
        if not size:
            return False
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; when this returns, the record is on disk."""
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._torn:
                line = b"\n" + line
            self._torn = True  # until the whole line is written: a failed write leaves a torn line
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            self._torn = False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


__all__ = [
    "KINDS",
    "Comparison",
    "Feedback",
    "FeedbackConfig",
    "FeedbackLog",
    "FeedbackMessage",
    "Rating",
    "feedback_record",
    "parse_feedback",
]
