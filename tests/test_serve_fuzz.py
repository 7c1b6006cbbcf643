"""Property-based fuzzing of `lmforge serve`: more than 1,000 malformed requests (bad JSON, wrong types,
huge n, negative max_tokens, invalid UTF-8, lone surrogates, deep nesting, oversized bodies, wrong methods)
through the whole ASGI app in process (httpx ASGITransport, the real engine and a tiny real model).
Every answer must be a well-formed JSON error or a real completion, never a 5xx; afterwards a canary
request is still answered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_helpers import close, make_app

KEY = "sk-fuzz-0123456789abcdef"
CAP = 65536  # max_body_bytes of the fuzzed server

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "stop", "seed", "stream", "stream_options", "logprobs", "echo", "ignore_eos", "model",
    "response_format",
]  # fmt: skip


def _valid(chat: bool) -> dict[str, Any]:
    if chat:
        return {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {"model": "tiny-test", "prompt": "To be", "max_tokens": 2}


FORMATS = st.one_of(
    st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}, {"type": "text"}]),
    json_value,
)


@st.composite
def bad_request(draw: st.DrawFn) -> tuple[str, str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    chat = path.endswith("chat/completions")
    kind = draw(st.integers(0, 9))
    if kind == 0:  # arbitrary bytes: mostly invalid UTF-8 and invalid JSON
        return "POST", path, draw(st.binary(max_size=200))
    if kind == 1:  # any JSON value at all
        return "POST", path, json.dumps(draw(json_value)).encode()
    if kind in (2, 3):  # a valid request with one or two fields replaced by anything
        body = _valid(chat)
        for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2)):
            body[field] = draw(json_value if field != "response_format" else FORMATS)
        return "POST", path, json.dumps(body).encode()
    if kind == 4:  # numbers at and beyond the edges
        body = _valid(chat)
        field = draw(st.sampled_from(["n", "max_tokens", "seed", "top_k", "temperature", "top_p"]))
        body[field] = draw(
            st.sampled_from([0, -1, -3, 5, 10**6, 2**63, 2**64, -(2**63) - 1, 1e308, 1e-320, 2.5, "3", True])
        )
        if draw(st.booleans()):  # the same edges with the JSON-object grammar on
            body["response_format"] = {"type": "json_object"}
        return "POST", path, json.dumps(body).encode()
    if kind == 5:  # invalid UTF-8 or lone surrogates inside strings
        raw = draw(
            st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\\udfff x", b"\x00"])
        )
        key = b"messages" if chat else b"prompt"
        if chat:
            return (
                "POST",
                path,
                b'{"messages": [{"role": "user", "content": "' + raw + b'"}], "max_tokens": 2}',
            )
        return "POST", path, b'{"' + key + b'": "' + raw + b'", "max_tokens": 2}'
    if kind == 6:  # deep nesting, in arrays or objects, inside a field or as the whole body
        depth = draw(st.integers(100, 30000))
        inner = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if inner == "[" else "}"
        nested = inner * depth + "1" + closer * depth
        if draw(st.booleans()):
            return "POST", path, nested.encode()
        return "POST", path, ('{"prompt": ' + nested + ', "messages": ' + nested + "}").encode()
    if kind == 7:  # oversized: just over the cap, or far over
        size = draw(st.sampled_from([CAP + 1, CAP + 1000, 4 * CAP]))
        return "POST", path, b'{"prompt": "' + b"a" * size + b'"}'
    if kind == 8:  # wrong method or unknown route
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        other = draw(st.sampled_from([path, "/v1/models", "/v1/../v1/models", "/v1/%00", "/" + "a" * 500]))
        return method, other, draw(st.binary(max_size=50))
    # kind 9: messages with wrong roles, shapes and content parts
    body = _valid(True)
    body["messages"] = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "tool", "", "assistant", 1]),
                    "content": st.one_of(
                        st.text(max_size=20),
                        st.none(),
                        st.lists(
                            st.fixed_dictionaries(
                                {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=5)}
                            ),
                            max_size=2,
                        ),
                        json_value,
                    ),
                }
            ),
            max_size=3,
        )
    )
    return "POST", "/v1/chat/completions", json.dumps(body).encode()


@pytest.fixture(scope="module")
def fuzz_app() -> Iterator[Any]:
    app = make_app(
        keys=[KEY],
        max_body_bytes=CAP,
        max_tokens_cap=3,
        default_max_tokens=2,
        max_n=3,
        requests_per_minute=0,
        tokens_per_minute=0,
        max_queue=16,
    )
    yield app
    close(app)


def test_fuzzed_requests_never_5xx(fuzz_app: Any) -> None:
    loop = asyncio.new_event_loop()
    transport = httpx.ASGITransport(app=fuzz_app)
    # A JSON client on loopback: the Host, Origin and content-type refusals are fuzzed against a real server
    # in tests/test_hardening_serve.py.
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    client = httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers, timeout=60)
    seen: dict[int, int] = {}
    json_answers = [0]

    @settings(
        max_examples=1100,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(bad_request())
    def check(req: tuple[str, str, bytes]) -> None:
        method, path, body = req
        r = loop.run_until_complete(client.request(method, path, content=body))
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            # a valid streaming request: every event is JSON, the stream ends with [DONE], and no
            # choice streams more pieces than the max_tokens cap (3)
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", r.text[:300]
            pieces: dict[int, int] = {}
            for chunk in map(json.loads, events[:-1]):
                for c in chunk.get("choices", []):
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        pieces[c["index"]] = pieces.get(c["index"], 0) + 1
            assert all(n <= 3 for n in pieces.values()), pieces
            return
        data = r.json()  # every other answer is JSON
        if r.status_code >= 400:
            assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
        elif method == "POST" and path.startswith("/v1/"):
            assert data["usage"]["completion_tokens"] <= 3 * len(data["choices"])
            if json.loads(body).get("response_format") == {"type": "json_object"}:  # honoured, never ignored
                for c in data["choices"]:
                    assert isinstance(json.loads(c["text"] if "text" in c else c["message"]["content"]), dict)
                json_answers[0] += 1

    try:
        check()
        total = sum(seen.values())
        assert total >= 1000, seen
        assert seen.get(400, 0) >= 500 and seen.get(413, 0) >= 5, seen  # the refusals really were exercised
        assert json_answers[0] >= 3, seen  # answers constrained to JSON objects were exercised
        # The canary: the server still answers a normal request, and nothing is left running.
        r = loop.run_until_complete(
            client.post(
                "/v1/completions", json={"prompt": "To be, or not", "max_tokens": 3, "temperature": 0}
            )
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert fuzz_app.state.batcher.stats.failures == 0
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
