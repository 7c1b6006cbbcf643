"""The server's edge against web pages, stalling requests and extreme values, on a real uvicorn server:
foreign Host (421) / Origin (403) / non-JSON bodies (415) on every route with and without keys, a
190,000-prompt list refused before tokenization, slow clients closed at the read timeouts, and every
sampling parameter outside its range a 400 that names it (never a 5xx)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_helpers import BackgroundServer, close, make_app

KEY = "sk-harden-0123456789abcdef"
ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny-test"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/static/index.html"),
    ("GET", "/no/such/route"),
]
BODY = {"prompt": "To be", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module", params=[None, [KEY]], ids=["no-keys", "keys"])
def server(request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    app = make_app(keys=request.param, requests_per_minute=0, tokens_per_minute=0, max_tokens_cap=4)
    with BackgroundServer(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        srv.auth = {"Authorization": f"Bearer {KEY}"} if request.param else {}  # type: ignore[attr-defined]
        yield srv
    close(app)


def _send(c: httpx.Client, method: str, path: str, headers: dict[str, str], ctype: str) -> httpx.Response:
    return c.request(method, path, headers={"Content-Type": ctype, **headers}, content=json.dumps(BODY))


def test_foreign_host_origin_and_content_type_are_refused_on_every_route(server: BackgroundServer) -> None:
    auth: dict[str, str] = server.auth  # type: ignore[attr-defined]
    stats = server.app.state.batcher.stats  # type: ignore[attr-defined]
    own = f"http://127.0.0.1:{server.port}"
    before = stats.tokens
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path in ROUTES:
            for host in ["evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "[::2]"]:
                r = _send(c, method, path, {**auth, "Host": host}, "application/json")
                assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (path, host)
            for origin in ["http://evil.example", "null", "http://127.0.0.1:1", "https://localhost.evil"]:
                r = _send(c, method, path, {**auth, "Origin": origin}, "application/json")
                assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (
                    path,
                    origin,
                )
        for path in ["/v1/completions", "/v1/chat/completions"]:
            for ctype in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]:
                r = _send(c, "POST", path, {**auth, "Origin": own}, ctype)
                assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
        assert stats.tokens == before  # nothing was generated for any refused request
        # The loopback names (any port), the page's own origin and JSON types with parameters all pass.
        for host, origin in [
            ("localhost:9", None),
            ("[::1]", None),
            (None, own),
            (f"localhost:{server.port}", own.replace("127.0.0.1", "localhost")),
        ]:
            headers = {**auth, **({"Host": host} if host else {}), **({"Origin": origin} if origin else {})}
            assert c.get("/health", headers=headers).status_code == 200, (host, origin)
        for ctype in ["application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"]:
            r = _send(c, "POST", "/v1/completions", {**auth, "Origin": own}, ctype)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, ctype
        page = c.get("/", headers=auth)
        assert page.status_code == 200 and "chat/completions" in page.text


def test_configured_hosts_and_origins_are_allowed() -> None:
    app = make_app(allowed_hosts=["chat.example.com"], allowed_origins=["https://chat.example.com"])
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            proxied = {"Host": "chat.example.com", "Origin": "https://chat.example.com"}
            assert _send(c, "POST", "/v1/completions", proxied, "application/json").status_code == 200
            other = {"Host": "chat.example.com", "Origin": "https://chat.example.org"}
            assert _send(c, "POST", "/v1/completions", other, "application/json").status_code == 403
    finally:
        close(app)


def _health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.02)


def test_a_huge_prompt_list_is_refused_before_tokenization() -> None:
    # A 2 MB body cap: every body below is read and parsed, so the count and size checks refuse them.
    app = make_app(requests_per_minute=0, tokens_per_minute=0, max_body_bytes=2_000_000)
    calls = [0]
    prompts_of = app.state.prompts_of

    def counted(req: Any) -> Any:
        calls[0] += 1
        return prompts_of(req)

    app.state.prompts_of = counted
    stop, health = threading.Event(), []  # type: ignore[var-annotated]
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            prober = threading.Thread(target=_health_latencies, args=(srv.url, stop, health))
            prober.start()
            time.sleep(0.2)
            bodies = [
                {"prompt": ["a"] * 190_000, "max_tokens": 1},  # 950 kB: under the default cap too
                {"prompt": "a " * 450_000, "max_tokens": 1},  # one 900,000-character prompt
                {"prompt": list(range(190_000)), "max_tokens": 1},
                {"messages": [{"role": "user", "content": "a"}] * 30_000, "max_tokens": 1},
                {"messages": [{"role": "user", "content": "a " * 400_000}], "max_tokens": 1},
            ]
            for body in bodies:
                t0 = time.monotonic()
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                r = c.post(path, json=body)
                took = time.monotonic() - t0
                assert r.status_code == 400 and took < 1.0, (r.status_code, took, r.text[:200])
            time.sleep(0.2)
            stop.set()
            prober.join()
    finally:
        stop.set()
        close(app)
    assert calls[0] == 0  # no prompt was tokenized
    # /health stays answered while the bodies are refused: the bound leaves room for a loaded 2-core machine
    # (parsing a 2 MB body holds the loop well under a second); tokenizing them would take far longer
    assert len(health) >= 5 and max(health) < 2.0, max(health)


def _closed_within(sock: socket.socket, limit: float, t0: float) -> tuple[float, bytes]:
    """(seconds from t0 until the server closed the connection, what it sent), waiting up to `limit`."""
    sock.settimeout(max(limit - (time.monotonic() - t0), 0.01))
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return float("inf"), got
    except ConnectionResetError:
        pass
    return time.monotonic() - t0, got


def _connect(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_slow_clients_are_closed_at_the_read_timeouts() -> None:
    app = make_app(header_timeout_s=1.0, body_timeout_s=1.0)
    margin = 1.5  # two busy cores
    stop, health = threading.Event(), []  # type: ignore[var-annotated]
    try:
        with BackgroundServer(app) as srv:
            prober = threading.Thread(target=_health_latencies, args=(srv.url, stop, health))
            prober.start()
            body = b'{"prompt": "To be", "max_tokens": 1}'
            full = HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
            cases = {
                "nothing": b"",
                "half a head": HEAD[:30],
                "a head without its end": HEAD,
                "head + half a body": HEAD + b"Content-Length: 100\r\n\r\n" + body[:10],
                "GET + half a body": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\nab",
                "a request, then half a head": full + HEAD[:20],
            }
            t0 = time.monotonic()
            socks = {name: _connect(srv.port, data) for name, data in cases.items()}
            crowd = [_connect(srv.port, HEAD[:40]) for _ in range(100)]  # 100 half-sent heads at once
            for name, s in socks.items():
                took, got = _closed_within(s, 1.0 + margin + 2.0, t0)
                assert took <= 1.0 + margin, (name, took, got[:100])
                if name == "head + half a body":
                    assert got.startswith(b"HTTP/1.1 408") and b'"type":"timeout"' in got, got[:300]
                if name.startswith(("GET", "a request")):
                    assert got.startswith(b"HTTP/1.1 200"), got[:100]  # answered, then closed
                s.close()
            for s in crowd:
                assert _closed_within(s, 1.0 + margin + 2.0, t0)[0] <= 1.0 + margin
                s.close()
            stop.set()
            prober.join()
            assert health and max(health) < 0.5, max(health)
            with httpx.Client(base_url=srv.url, timeout=30) as c:  # a prompt client is not cut off
                assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        stop.set()
        close(app)


REFUSED: list[tuple[str, Any]] = [
    ("temperature", 1e-300),
    ("temperature", 5e-324),
    ("temperature", 9e-6),
    ("temperature", 2.5),
    ("temperature", 1e308),
    ("temperature", -1e-300),
    ("repetition_penalty", 1e-300),
    ("repetition_penalty", 0.05),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 11.0),
    ("top_p", 0.0),
    ("top_p", 1.0000001),
    ("min_p", -5e-324),
    ("min_p", 1.5),
    ("top_k", -1),
    ("seed", -1),
    ("seed", 2**63),
    ("max_tokens", 0),
    ("n", 0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -1e308),
]
ACCEPTED: list[tuple[str, Any]] = [
    ("temperature", 0),
    ("temperature", -0.0),
    ("temperature", 1e-5),
    ("temperature", 2),
    ("repetition_penalty", 0.1),
    ("repetition_penalty", 10),
    ("top_p", 5e-324),
    ("top_p", 1),
    ("min_p", 0),
    ("min_p", 5e-324),
    ("min_p", 1),
    ("top_k", 1),
    ("top_k", 10**30),
    ("seed", 0),
    ("seed", 2**63 - 1),
]


def test_sampling_parameters_outside_their_range_are_400_naming_the_field() -> None:
    app = make_app(requests_per_minute=0, tokens_per_minute=0)
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            for field, value in REFUSED:
                for path in ["/v1/completions", "/v1/chat/completions"]:
                    r = c.post(path, json={**BODY, "max_tokens": 3, field: value})
                    assert r.status_code == 400 and r.json()["error"]["param"] == field, (
                        field,
                        value,
                        r.text,
                    )
            for literal in ["NaN", "Infinity", "-Infinity"]:  # what Python's json writes and reads
                for field in ["temperature", "repetition_penalty", "top_p", "min_p"]:
                    raw = f'{{"prompt": "a", "max_tokens": 2, "{field}": {literal}}}'
                    r = c.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
                    assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, literal)
            prompt = "To be, or not to be, to be"  # repeats: the penalty applies to seen tokens
            for field, value in ACCEPTED:
                for seed in (None, 1):
                    body = {"prompt": prompt, "max_tokens": 3, "seed": seed, field: value}
                    r = c.post("/v1/completions", json=body)
                    assert r.status_code == 200, (field, value, r.text)
                    assert r.json()["usage"]["completion_tokens"] <= 3
            both = {"prompt": prompt, "max_tokens": 3, "temperature": 1e-5, "repetition_penalty": 0.1}
            assert c.post("/v1/completions", json=both).status_code == 200
        assert app.state.batcher.stats.failures == 0
    finally:
        close(app)
