"""POST /v1/embeddings: one vector per input, the mean over its tokens of the model's final hidden states
(after the final norm, `Transformer.features`), as OpenAI's embeddings API answers it.

    client.embeddings.create(model="demo", input=["first text", "second text"])   # or token id lists

A causal language model was not trained to make these vectors similar for similar texts, so they are a
baseline for retrieval (what `sentence-transformers`' mean pooling over a decoder gives), not a tuned
embedding model; the dimension is the model's `dim`. Inputs are encoded as plain text (no BOS, no chat
template). The request goes through the same key, Host/Origin, body size, content type, rate limit and
prompt-length checks as the completion routes; the inputs are right-padded into batches of
`max_batch_size` (causal attention: a token never sees the padding after it, so a batch gives each input
the vector it gets alone) and run off the event loop, beside the engine's worker.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import numpy as np
import torch

from lmforge.serve.limits import RateLimited, TooLarge
from lmforge.serve.protocol import ApiError, EmbeddingRequest, parse_request
from lmforge.serve.state import ServerState, check_text

_lock = threading.Lock()  # one embedding batch at a time: they share the CPU with generation


def input_ids(state: ServerState, req: EmbeddingRequest) -> list[list[int]]:
    """Each input's token ids, checked against the server's limits (400 naming what is wrong)."""
    raw = req.input
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise ApiError(400, "input: empty list", param="input")
    if len(items) > state.cfg.max_embedding_inputs:
        raise ApiError(
            400,
            f"input: {len(items)} inputs; this server accepts at most {state.cfg.max_embedding_inputs}",
            param="input",
        )
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if len(item) > state.max_prompt_chars:
                raise ApiError(400, f"input[{i}] is too long", param="input", code="context_length_exceeded")
            check_text(item, "input")
            ids = list(state.tok.encode(item))
        else:
            ids = [int(t) for t in item]
            bad = [t for t in ids if not 0 <= t < state.vocab]
            if bad:
                raise ApiError(
                    400, f"input[{i}]: token id {bad[0]} outside [0, {state.vocab})", param="input"
                )
        if not ids:
            raise ApiError(400, f"input[{i}]: empty (at least one token is needed)", param="input")
        if len(ids) > state.max_prompt:
            raise ApiError(
                400,
                f"input[{i}] is {len(ids)} tokens; this server accepts at most {state.max_prompt}",
                param="input",
                code="context_length_exceeded",
            )
        out.append(ids)
    return out


def mean_pooled(model: Any, rows: list[list[int]], batch: int, pad_id: int) -> list[np.ndarray]:
    """The mean of each row's final hidden states, float32, in batches of `batch` right-padded rows."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    with _lock, torch.inference_mode():
        for first in range(0, len(rows), batch):
            chunk = rows[first : first + batch]
            T = max(map(len, chunk))
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long, device=device)
            keep = torch.zeros(len(chunk), T, 1, device=device)
            for r, row in enumerate(chunk):
                ids[r, : len(row)] = torch.tensor(row, device=device)
                keep[r, : len(row)] = 1.0
            h = model.features(ids).float()  # (B, T, dim)
            pooled = (h * keep).sum(1) / keep.sum(1)  # (B, dim)
            out += list(pooled.cpu().numpy())
    return out


async def embeddings(state: ServerState, request: Any) -> dict[str, Any]:
    """Admit (rate limit, body cap, content type, schema, model, limits), pool, answer."""
    try:
        _, ticket, body = await state.admit_body(request)
        req = parse_request(body, EmbeddingRequest)
        state.check_model(req.model)
        dim = int(state.engine.model.cfg.dim)
        if req.dimensions is not None and req.dimensions != dim:
            raise ApiError(400, f"dimensions: this model's embeddings have {dim}", param="dimensions")
        rows = await asyncio.to_thread(input_ids, state, req)
        tokens = sum(map(len, rows))
        state.limiter.charge(ticket, tokens)
    except RateLimited as e:
        raise ApiError(
            429, str(e), type="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}
        ) from None
    except TooLarge as e:
        raise ApiError(400, str(e), param="input") from None
    vectors = await asyncio.to_thread(
        mean_pooled, state.engine.model, rows, state.cfg.max_batch_size, int(state.tok.pad_id)
    )
    state.limiter.settle(ticket, tokens)
    request.scope["lmforge.usage"] = {"prompt_tokens": tokens, "completion_tokens": 0}

    def encode(v: np.ndarray) -> Any:
        if req.encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": state.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


__all__ = ["embeddings", "input_ids", "mean_pooled"]
