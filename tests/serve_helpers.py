"""A tiny real model + tokenizer + Engine for the serve tests (built in about a second, no download), and a
uvicorn server in a thread to run the app on."""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Any

from lmforge.infer.engine import Engine
from lmforge.model.config import get_preset
from lmforge.model.transformer import build_model
from lmforge.serve.app import create_app
from lmforge.serve.state import ServeConfig
from lmforge.serve.timeouts import timed_h11
from lmforge.tokenizer import Tokenizer, train_tokenizer
from tokenizer_corpus import shakespeare_docs


@functools.cache
def tiny_model() -> tuple[Any, Tokenizer]:
    """A random tiny Llama and a 512-token BPE trained on real Shakespeare text (shared by the tests)."""
    texts = [d["text"] for d in shakespeare_docs(files=1)]
    tok = train_tokenizer(texts, vocab_size=512)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256), seed=0)
    return model, tok


def make_app(keys: list[str] | None = None, **overrides: Any) -> Any:
    model, tok = tiny_model()
    cfg = ServeConfig(model="tiny-test", **overrides)
    engine = Engine(model, tok, max_batch_size=cfg.max_batch_size)
    return create_app(engine, tok, cfg, keys)


def close(app: Any) -> None:
    app.state.close()


class BackgroundServer:
    """Run an app with uvicorn in a thread on 127.0.0.1 (port 0 = a free one).

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
        cfg = app.state.cfg  # the read timeouts, as `lmforge serve` runs uvicorn
        config = uvicorn.Config(
            app,
            http=timed_h11(cfg.header_timeout_s, cfg.body_timeout_s),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
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
