"""A tiny real model + tokenizer + Engine for the serve tests (built in about a second, no download)."""

from __future__ import annotations

import functools
from typing import Any

from lmforge.infer.engine import Engine
from lmforge.model.config import get_preset
from lmforge.model.transformer import build_model
from lmforge.serve.app import ServeConfig, create_app
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
