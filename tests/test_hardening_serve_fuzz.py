"""A seeded fuzz of a REAL `lmforge serve` (uvicorn on loopback, no keys: the server a web page could reach):
2,400 malformed or extreme requests from 4 clients at once (extreme floats, NaN/Infinity literals, huge
lists and strings, invalid UTF-8, wrong content types, foreign Host and Origin headers, bad methods and
paths, raw garbage heads), while a fifth client times /health. Zero 5xx, zero 2xx to a foreign Host or
Origin, /health p99 under 0.5 s (measured here: ~0.05 s on 2 busy cores), and the server still answers."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from typing import Any

import httpx

from serve_helpers import BackgroundServer, close, make_app

N_CLIENTS, PER_CLIENT = 4, 600
CAP = 200_000  # the fuzzed server's max_body_bytes
FLOATS: list[Any] = [
    1e-300, 5e-324, -5e-324, 1e308, -1e308, -0.0, 0.0, 1e-5, 9.9e-6, 0.1, 0.0999, 1.0, 2.0, 2.0000001, 10.0,
    10.5, 1.5, "NaN", "Infinity", "-Infinity", 2**63, -(2**63), 2**64, 10**30, -1, 0, 1, True, None, "1", [],
]  # fmt: skip
FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "n",
          "presence_penalty", "frequency_penalty", "max_completion_tokens"]  # fmt: skip
CTYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
          "application/jsonx", "application/json-patch", "json", "*/*", "text/json"]  # fmt: skip
HOSTS = ["evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.2", "[::2]:8000", "", "a b"]
ORIGINS = ["http://evil.example", "null", "http://127.0.0.1:1", "https://localhost", "file://", "x"]
PATHS = ["/v1/completions/x", "/v1/../v1/models", "/%00", "/%ff%fe", "/" + "a" * 3000, "/v1/embeddings",
         "/static/../../etc/passwd", "/v1/models/" + "x" * 500, "//health"]  # fmt: skip


def _literal(v: Any) -> str:
    return v if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity") else json.dumps(v)


def _body(rng: random.Random, chat: bool) -> bytes:
    """A request with 1-3 sampling fields at extreme values, as raw JSON (NaN/Infinity literals included)."""
    base: dict[str, Any] = {"max_tokens": rng.choice([1, 2])}
    if chat:
        base["messages"] = [{"role": "user", "content": rng.choice(["hi", "", "\u0000", "x" * 50])}]
    else:
        base["prompt"] = rng.choice(["To be", "", [1, 2, 3], ["a", "b"], [], [0], "é"])
    text = json.dumps(base)[:-1]
    for field in rng.sample(FIELDS, rng.randint(1, 3)):
        text += f', "{field}": {_literal(rng.choice(FLOATS))}'
    return (text + "}").encode()


def _case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes, bool]:
    """(method, path, headers, body, foreign): one fuzzed request; foreign = must never be answered 2xx."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    json_h = {"Content-Type": "application/json"}
    kind = rng.randrange(10)
    if kind <= 2:
        return "POST", path, json_h, _body(rng, chat), False
    if kind == 3:  # foreign Host or Origin on any route
        method, route = rng.choice([("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"), ("POST", path)])
        h = {"Host": rng.choice(HOSTS)} if rng.random() < 0.5 else {"Origin": rng.choice(ORIGINS)}
        return method, route, {**json_h, **h}, _body(rng, chat), True
    if kind == 4:  # wrong content type for a JSON body (a browser's form or text/plain POST)
        return "POST", path, {"Content-Type": rng.choice(CTYPES)}, _body(rng, chat), False
    if kind == 5:  # invalid UTF-8, NUL bytes, truncated JSON, random bytes
        raw = rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x00", b'{"prompt": "\xc3\x28"}'])
        body = rng.choice([raw, _body(rng, chat)[: rng.randint(0, 30)], rng.randbytes(rng.randint(0, 200))])
        return "POST", path, json_h, body, False
    if kind == 6:  # huge lists and strings: under the cap (refused by count/size checks) and over it
        size = rng.choice([CAP // 8, CAP // 2, CAP - 100, CAP + 1, 2 * CAP])
        if rng.random() < 0.5:
            body = json.dumps({"prompt": ["a"] * (size // 5), "max_tokens": 1}).encode()
        elif chat:
            body = json.dumps({"messages": [{"role": "user", "content": "a" * size}]}).encode()
        else:
            body = json.dumps({"prompt": "a" * size, "max_tokens": 1}).encode()
        return "POST", path, json_h, body, False
    if kind == 7:  # bad methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW", "POST"])
        return method, rng.choice([*PATHS, path, "/health"]), json_h, rng.randbytes(rng.randint(0, 40)), False
    if kind == 8:  # deep nesting and odd JSON values
        depth = rng.choice([50, 5000, 50000])
        body = rng.choice([b"[" * depth + b"]" * depth, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"])
        return "POST", path, json_h, rng.choice([body, b"null", b"[]", b'"x"', b"1e999"]), False
    # kind 9: a well-formed request at the edges of the limits
    body = {
        "prompt": "a",
        "max_tokens": rng.choice([1, 2, 3]),
        "n": rng.choice([1, 2, 3]),
        "stream": rng.random() < 0.3,
    }
    return "POST", "/v1/completions", json_h, json.dumps(body).encode(), False


RAW_GARBAGE = [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",  # no Host
               b"\x16\x03\x01\x00\xa5\x01\x00", b"GET /health HTTP/1.1\r\nHost: localhost\r\nX: \x00\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n"]  # fmt: skip


def _raw(port: int, data: bytes) -> int:
    """The status of the server's answer to raw bytes (0: closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        try:
            head = s.recv(64)
        except (ConnectionResetError, TimeoutError):
            return 0
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0


def _client(url: str, seed: int, out: list[tuple[int, bool, str]]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(PER_CLIENT):
            method, path, headers, body, foreign = _case(rng)
            try:
                r = c.request(method, path, headers=headers, content=body)
                out.append((r.status_code, foreign, f"{method} {path[:40]} {headers} {body[:80]!r}"))
            except httpx.LocalProtocolError:  # a header httpx itself will not send ("a b" as Host)
                out.append((0, foreign, "refused by the client"))


def test_fuzzed_real_server_never_5xx_and_health_stays_fast() -> None:
    app = make_app(
        max_body_bytes=CAP, max_tokens_cap=3, default_max_tokens=2, max_n=3, max_queue=32,
        requests_per_minute=0, tokens_per_minute=0, batch_wait_ms=0,
    )  # fmt: skip
    results: list[tuple[int, bool, str]] = []
    health: list[float] = []
    stop = threading.Event()
    try:
        with BackgroundServer(app) as srv:

            def probe() -> None:
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    while not stop.is_set():
                        t0 = time.monotonic()
                        assert c.get("/health").status_code == 200
                        health.append(time.monotonic() - t0)
                        time.sleep(0.02)

            prober = threading.Thread(target=probe)
            prober.start()
            t0 = time.monotonic()
            workers = [threading.Thread(target=_client, args=(srv.url, i, results)) for i in range(N_CLIENTS)]
            for w in workers:
                w.start()
            raw = [_raw(srv.port, data) for data in RAW_GARBAGE * 10]
            for w in workers:
                w.join()
            took = time.monotonic() - t0
            stop.set()
            prober.join()
            with httpx.Client(base_url=srv.url, timeout=30) as c:  # the canary
                r = c.post("/v1/completions", json={"prompt": "To be", "max_tokens": 3, "temperature": 0})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        stop.set()
        close(app)
    codes: dict[int, int] = {}
    for status, _, _ in results:
        codes[status] = codes.get(status, 0) + 1
    assert len(results) + len(raw) >= 2000, codes
    assert [d for s, _, d in results if s >= 500] == [], codes
    assert [d for s, f, d in results if f and 200 <= s < 300] == [], codes
    assert all(s == 0 or 400 <= s < 500 for s in raw), raw
    # every refusal was exercised, and real completions were served between them
    assert all(codes.get(s, 0) >= 10 for s in (200, 400, 403, 413, 415, 421)), codes
    health.sort()
    p99 = health[int(0.99 * (len(health) - 1))]
    print(f"fuzz: {len(results)} requests in {took:.1f} s, codes {codes}; /health p99 {p99 * 1e3:.0f} ms")
    assert len(health) >= 20 and p99 < 0.5, (p99, health[-5:])
    assert app.state.batcher.stats.failures == 0
