"""The server's edge: API keys, the JSON error shape, security headers, one log line per request, the page.

Wraps every route, including unknown paths: a request without a valid key gets 401 (the chat page asks
for the key instead), a bug answers 500 JSON and the server lives on. Logs name the method, route,
status, latency, token counts and a key fingerprint; never a prompt, an output or a key.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any

from lmforge.serve.auth import fingerprint, match_key
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
                            LOGIN_PAGE, status_code=401, headers={"Content-Security-Policy": CSP}
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


def chat_page() -> str:
    """The chat page (static/index.html), served at GET /."""
    return resources.files("lmforge.serve").joinpath("static/index.html").read_text("utf-8")


def page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}


__all__ = ["CSP", "LOGIN_PAGE", "Edge", "chat_page", "log", "page_headers"]
