"""`lmforge serve`: an OpenAI-compatible HTTP API and a chat page over one model, with keys and limits.

    lmforge serve runs/demo/pretrain                          # http://127.0.0.1:8000, chat page at /
    LMFORGE_API_KEYS=$(cat keys) lmforge serve runs/demo/pretrain host=0.0.0.0 requests_per_minute=30

Routes: `GET /health` (no key), `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(`stream: true` for server-sent events; `response_format: {"type": "json_object"}` constrains the answer to
a JSON object), `POST /v1/embeddings` (mean-pooled final hidden states), `POST /v1/feedback` (ratings
and comparisons of answers, with `feedback.enabled`: serve.feedback), `GET /` (the chat page). Any OpenAI
client works:
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`.

What a request goes through, in order (each refusal is an OpenAI-style `{"error": {...}}`):

    head within header_timeout_s (else closed) -> Host (421) -> Origin (403) -> key (401)
      -> body size (413), body within body_timeout_s (408) -> JSON content type (415) -> JSON + schema (400)
      -> n x prompts, prompt sizes (400, before tokenizing) -> tokenize (in a thread)
      -> prompt tokens, max_tokens cap, context (400)
      -> per-key requests/min and tokens/min (429 + Retry-After) -> bounded queue (503 + Retry-After)
      -> the engine's worker thread (batches of queued requests) -> response / SSE stream
      -> timeout or client gone: the row is cancelled at the engine's next step

Logs name the method, route, status, latency, token counts and a key fingerprint; never a prompt, an output
or a key (unless `log_prompts=true`). This module is the command: it builds the app from `routes`
(endpoints), `edge` (keys, errors, logs) and `state` (config, request checks).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from lmforge import audit
from lmforge.config import parse_command
from lmforge.device import pick_device
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.model.source import load_model
from lmforge.serve.audit_trail import config_hash
from lmforge.serve.auth import check_bind, fingerprint, load_keys
from lmforge.serve.edge import Edge, log
from lmforge.serve.feedback import FeedbackLog
from lmforge.serve.filters import OutputFilter
from lmforge.serve.routes import add_error_handlers, add_routes
from lmforge.serve.state import ServeConfig, ServerState
from lmforge.serve.timeouts import timed_h11

CONFIG = ServeConfig


def create_app(engine: Any, tokenizer: Any, cfg: ServeConfig, keys: list[str] | None = None) -> Any:
    """The ASGI app over a ready `Engine`; starts the engine's worker thread (stopped at shutdown)."""
    from fastapi import FastAPI

    state = ServerState(engine, tokenizer, cfg, list(keys or []))

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        if state.audit.enabled:
            state.audit.event("serve.start", start_record(cfg, keys or []))
        yield
        state.close()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.lmforge = state
    add_error_handlers(app)
    add_routes(app, state)
    return Edge(app, state)


def start_record(cfg: ServeConfig, keys: list[str]) -> dict[str, Any]:
    """What the audit log says about a server at start: config hash, model identity, address, keys."""
    model = Path(cfg.model).expanduser()
    return {
        "config_sha256": config_hash(cfg),
        "model": audit.describe(model) if model.exists() else {"name": cfg.model},
        "host": cfg.host,
        "port": cfg.port,
        "api_keys": sorted(fingerprint(k) for k in keys),
    }


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
    if cfg.feedback.enabled:
        FeedbackLog(cfg.feedback.path).close()  # an unwritable feedback.path fails before the model loads
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("lmforge serve needs the serve extra: pip install 'lmforge[serve]'") from None

    pick_device(cfg.device)  # a device this machine lacks is a ConfigError before the model loads
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tok = load_model(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    engine = Engine(model, tok, max_batch_size=cfg.max_batch_size, compile=cfg.compile)
    app = create_app(engine, tok, cfg, keys)
    where = "with API keys" if keys else "without API keys (loopback only)"
    log.info("serving %s on http://%s:%d %s", cfg.model, cfg.host, cfg.port, where)
    http = timed_h11(cfg.header_timeout_s, cfg.body_timeout_s)  # uvicorn itself never times out a head
    uvicorn.run(app, host=cfg.host, port=cfg.port, http=http, log_level="warning", access_log=False)
    return 0  # serve.start and serve.stop are audited by the app's lifespan


__all__ = ["CONFIG", "create_app", "main"]
