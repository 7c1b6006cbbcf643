"""OpenAI conformance of `lmforge serve`, through the official `openai` client against a real server:
response_format json_object honoured (every sampled answer parses as an object) and json_schema or an
unknown type refused with 400; an unknown model id 404 with code model_not_found; /v1/embeddings equal to
a direct mean-pool of the model's final hidden states, batched equal to one by one, in float and base64."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import torch

from serve_helpers import BackgroundServer, close, make_app, tiny_model

KEY = "sk-conform-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    app = make_app(keys=[KEY], requests_per_minute=0, tokens_per_minute=0, max_n=4, max_embedding_inputs=8)
    with BackgroundServer(app) as srv:
        yield srv
    close(app)


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_json_object_answers_all_parse(client: openai.OpenAI) -> None:
    answers = []
    for seed, max_tokens in [(1, 3), (2, 9), (3, 40)]:
        chat = client.chat.completions.create(
            model="tiny-test",
            messages=[{"role": "user", "content": "Reply in JSON"}],
            response_format={"type": "json_object"},
            max_tokens=max_tokens,
            n=4,
            seed=seed,
            temperature=1.0,
        )
        assert chat.usage is not None and chat.usage.completion_tokens <= 4 * max_tokens
        answers += [c.message.content or "" for c in chat.choices]
    stream = client.chat.completions.create(
        model="tiny-test",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=20,
        seed=4,
        stream=True,
    )
    answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    text = client.completions.create(
        model="tiny-test",
        prompt="{",
        max_tokens=12,
        seed=5,
        extra_body={"response_format": {"type": "json_object"}},
    )
    answers.append(text.choices[0].text)
    assert len(answers) == 14
    for a in answers:
        assert isinstance(json.loads(a), dict), a


def test_unsupported_formats_and_unknown_models_are_refused(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for fmt, words in [
        (schema, "json_schema is not supported"),
        ({"type": "yaml"}, "expected 'text' or 'json_object'"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny-test", messages=msgs, response_format=fmt, max_tokens=4
            )  # type: ignore[arg-type]
        assert e.value.status_code == 400 and words in e.value.message
    with pytest.raises(openai.BadRequestError, match="stop and ignore_eos"):
        client.chat.completions.create(
            model="tiny-test", messages=msgs, response_format={"type": "json_object"}, stop=["}"]
        )  # type: ignore[arg-type]
    plain = client.chat.completions.create(
        model="tiny-test", messages=msgs, response_format={"type": "text"}, max_tokens=3, temperature=0
    )  # type: ignore[arg-type]
    assert plain.choices[0].finish_reason in ("length", "stop")
    for call in [
        lambda: client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2),  # type: ignore[arg-type]
        lambda: client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2),
        lambda: client.embeddings.create(model="gpt-4o", input="hi"),
        lambda: client.models.retrieve("gpt-4o"),
    ]:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        body = e.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found" and "gpt-4o" in body["message"]
        assert set(body) == {"message", "type", "param", "code"}
    assert [m.id for m in client.models.list().data] == ["tiny-test"]


def _direct(ids: list[int]) -> np.ndarray:
    model, _ = tiny_model()
    with torch.inference_mode():
        return model.features(torch.tensor([ids])).float().mean(1)[0].numpy()


def test_embeddings_are_mean_pooled_hidden_states(client: openai.OpenAI, server: BackgroundServer) -> None:
    _, tok = tiny_model()
    texts = ["To be, or not to be", "KING:", "A horse! a horse! my kingdom for a horse!"]
    one = [client.embeddings.create(model="tiny-test", input=t).data[0].embedding for t in texts]
    batch = client.embeddings.create(model="tiny-test", input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    for t, alone, together in zip(texts, one, batch.data, strict=True):
        want = _direct(tok.encode(t))
        assert len(alone) == want.shape[0] == tiny_model()[0].cfg.dim == 128
        np.testing.assert_allclose(alone, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(together.embedding, alone, atol=1e-5, rtol=0)
    ids = tok.encode("KING:")
    by_ids = client.embeddings.create(model="tiny-test", input=[ids, ids[:1]])
    np.testing.assert_allclose(by_ids.data[0].embedding, one[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_ids.data[1].embedding, _direct(ids[:1]), atol=1e-5, rtol=0)
    # base64 by hand: little-endian float32, the same numbers
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        server.url + "/v1/embeddings", json={"input": "KING:", "encoding_format": "base64"}, headers=h
    )
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, one[1], atol=1e-6, rtol=0)
    refusals = [
        ({"input": []}, "empty list"),
        ({"input": ""}, "empty"),
        ({"input": ["a"] * 9}, "at most 8"),
        ({"input": [[10**6]]}, "outside"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
    ]
    for body, words in refusals:
        r = httpx.post(server.url + "/v1/embeddings", json=body, headers=h)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "x"}).status_code == 401
