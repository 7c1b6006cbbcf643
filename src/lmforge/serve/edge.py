"""The server's edge: Host/Origin checks, API keys, the body deadline, the JSON error shape, security
headers, one log line and one audit record (`serve.audit_trail`) per request, the page.

Wraps every route, including unknown paths: a foreign Host gets 421 and a foreign Origin 403 (see
`serve.guard`), a request without a valid key gets 401 (the chat page asks for the key instead), a body
still arriving after `body_timeout_s` gets 408, a bug answers 500 JSON and the server lives on. Logs name the method, route,
status, latency, token counts and a key fingerprint; never a prompt, an output or a key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

from lmforge.serve.audit_trail import refusal_reason
from lmforge.serve.auth import bearer_token, fingerprint, match_key
from lmforge.serve.guard import allowed_host_names, host_allowed, origin_allowed
from lmforge.serve.limits import BodyTimeout
from lmforge.serve.protocol import ApiError
from lmforge.serve.state import ServerState

log = logging.getLogger("lmforge.serve")

LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>lmforge: API key</title>
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

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'"


class Edge:
    """Pure ASGI middleware: Host and Origin checks and API keys on every route (keys: all but /health),
    a deadline on reading the body, JSON errors, one log line per request."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        self.hosts = allowed_host_names(state.cfg.host, state.cfg.allowed_hosts)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]
        error_body: list[bytes] = []  # a refusal's JSON body, for the audit record's reason

        async def send_logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] >= 400 and not error_body:
                error_body.append(bytes(message.get("body", b""))[:4096])
            await send(message)

        path = scope.get("path", "")
        receive = body_deadline(receive, self.state.cfg.body_timeout_s)
        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_logged)
                return
            await self.app(scope, receive, send_logged)
        except Exception as e:  # the last line of defence: a bug answers 500 JSON, the server lives on
            log.error("unhandled %s on %s %s: %s", type(e).__name__, scope.get("method"), path, e)
            if status[0] == 0:
                await ApiError(500, "internal error", type="server_error").response()(
                    scope, receive, send_logged
                )
        finally:
            u = scope.get("lmforge.usage") or {}
            probe = path == "/health" and 0 < status[0] < 400  # a load balancer's probe every few seconds
            if self.state.audit.enabled and not probe:
                self.audit(scope, status[0] or 499, u, t0, error_body)
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

    def audit(self, scope: Any, status: int, usage: dict[str, Any], t0: float, body: list[bytes]) -> None:
        """The request's audit record: who (key fingerprint, client), what (route, status, tokens), why a
        refusal was refused; never the body."""
        path = scope.get("path", "")
        client = scope.get("client")
        data: dict[str, Any] = {
            "method": scope.get("method"),
            "route": path if len(path) <= 64 else path[:64] + "...",
            "status": status,
            "key": scope.get("lmforge.key") or scope.get("lmforge.refused_key"),
            "client": client[0] if client else None,
            "ms": round((time.perf_counter() - t0) * 1e3, 1),
        }
        data.update({k: usage[k] for k in ("prompt_tokens", "completion_tokens") if k in usage})
        if status >= 400:
            data["reason"] = refusal_reason(body[0]) if body else {}
        self.state.audit.request(data)

    def refusal(self, scope: Any) -> Any:
        """The response refusing this request (foreign Host 421, foreign Origin 403, no key 401), or None;
        records the key's fingerprint in the scope."""
        from starlette.datastructures import Headers
        from starlette.responses import HTMLResponse

        headers = Headers(scope=scope)
        host = headers.get("host")
        if not host_allowed(host, self.hosts):
            return ApiError(
                421,
                "this server does not answer for that Host (allowed_hosts)",
                type="forbidden",
                code="host_not_allowed",
            ).response()
        if not origin_allowed(
            headers.get("origin"), host, scope.get("scheme", "http"), self.state.cfg.allowed_origins
        ):
            return ApiError(
                403,
                "requests from other web origins are refused (allowed_origins)",
                type="forbidden",
                code="origin_not_allowed",
            ).response()
        keys = self.state.keys
        if not keys or scope.get("path", "") == "/health":
            return None
        key = match_key(headers.get("authorization"), keys)
        if key is not None:
            scope["lmforge.key"] = fingerprint(key)
            return None
        token = bearer_token(headers.get("authorization"))
        if token is not None:  # the audit record names the wrong key tried (its fingerprint)
            scope["lmforge.refused_key"] = fingerprint(token)
        if (
            scope.get("path") == "/"
            and scope.get("method") == "GET"
            and "text/html" in headers.get("accept", "")
        ):
            return HTMLResponse(LOGIN_PAGE, status_code=401, headers={"Content-Security-Policy": CSP})
        return ApiError(
            401,
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        ).response()


def body_deadline(receive: Any, seconds: float) -> Any:
    """`receive` that raises BodyTimeout if the request body is not all in `seconds` from now; once it is
    (or the client left), later calls (waiting for a disconnect while streaming) pass straight through."""
    deadline = time.monotonic() + seconds
    done = False

    async def receive_body() -> Any:
        nonlocal done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {seconds:g} s") from None
        done = message.get("type") != "http.request" or not message.get("more_body", False)
        return message

    return receive_body


def chat_page(feedback: bool = False) -> str:
    """The chat page (static/index.html), served at GET /; with `feedback`, its rating controls are on."""
    page = resources.files("lmforge.serve").joinpath("static/index.html").read_text("utf-8")
    return page.replace("<body>", '<body data-feedback="on">', 1) if feedback else page


def page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}


__all__ = ["CSP", "LOGIN_PAGE", "Edge", "body_deadline", "chat_page", "log", "page_headers"]
