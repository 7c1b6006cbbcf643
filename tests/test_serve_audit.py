"""The server's audit records: a real uvicorn server under concurrent openai-client requests writes
serve.start, one serve.request per request (key fingerprint, route, status, tokens, refusal reasons) and
serve.stop to the hash-chained log; no prompt, output or key is in it; the chain verifies; an edit is caught."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from lmforge import audit
from lmforge.errors import IntegrityError
from lmforge.serve.app import start_record
from lmforge.serve.state import ServeConfig
from serve_helpers import BackgroundServer, close, make_app

KEY = "sk-audit-0123456789abcdef"
PROMPT = "Zanzibar quokka sesquipedalian"  # must never reach the log
FP = "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:16]


def test_server_requests_are_on_the_chain_without_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv(audit.LOG_ENV, str(log))
    monkeypatch.delenv(audit.KEY_ENV, raising=False)
    app = make_app(keys=[KEY], requests_per_minute=0, tokens_per_minute=0, max_body_bytes=2048)
    outputs: list[str] = []
    try:
        with BackgroundServer(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

            def one(i: int) -> None:
                if i % 2:
                    r = client.completions.create(
                        model="tiny-test", prompt=f"{PROMPT} {i}", max_tokens=6, seed=i
                    )
                    outputs.append(r.choices[0].text)
                else:
                    c = client.chat.completions.create(
                        model="tiny-test", messages=[{"role": "user", "content": PROMPT}], max_tokens=5
                    )
                    outputs.append(c.choices[0].message.content or "")

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(16)))
            stream = client.completions.create(
                model="tiny-test",
                prompt=PROMPT,
                max_tokens=6,
                seed=99,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            assert sum(1 for _ in stream) >= 1
            h = {"Authorization": f"Bearer {KEY}"}
            url = srv.url + "/v1/completions"
            wrong = httpx.post(
                url, json={"prompt": PROMPT}, headers={"Authorization": "Bearer sk-wrong-key-1"}
            )
            big = httpx.post(url, json={"prompt": PROMPT * 200}, headers=h)
            plain = httpx.post(url, content=PROMPT, headers={**h, "Content-Type": "text/plain"})
            bad = httpx.post(url, json={"prompt": PROMPT, "max_tokens": -1}, headers=h)
            assert [wrong.status_code, big.status_code, plain.status_code, bad.status_code] == [
                401,
                413,
                415,
                400,
            ]
    finally:
        close(app)

    text = log.read_text(encoding="utf-8")
    assert "Zanzibar" not in text and "quokka" not in text and KEY not in text
    assert not [o for o in outputs if len(o.strip()) >= 8 and json.dumps(o)[1:-1] in text]
    records = audit.verify(log).records
    events = [r["event"] for r in records]
    assert events[0] == "serve.start" and events[-1] == "serve.stop"
    start = records[0]["data"]
    assert start["api_keys"] == [FP] and start["host"] == "127.0.0.1" and len(start["config_sha256"]) == 64
    requests = [r["data"] for r in records if r["event"] == "serve.request"]
    assert len(requests) == 21  # 16 answered + 1 streamed + 4 refused, each exactly once
    ok = [d for d in requests if d["status"] == 200]
    assert len(ok) == 17 and all(d["key"] == FP for d in ok)
    completions = [d for d in ok if d["route"] == "/v1/completions"]
    assert len(completions) == 9 and all(d["completion_tokens"] <= 6 for d in completions)
    assert completions[-1]["completion_tokens"] == 6  # the stream (ignore_eos), recorded when it ended
    assert all(d["prompt_tokens"] > 0 for d in ok)
    assert {d["route"] for d in ok} == {"/v1/completions", "/v1/chat/completions"}
    refused = {d["status"]: d for d in requests if d["status"] >= 400}
    assert sorted(refused) == [400, 401, 413, 415]
    wrong_fp = "key-" + hashlib.sha256(b"sk-wrong-key-1").hexdigest()[:16]
    assert refused[401]["key"] == wrong_fp and refused[401]["reason"]["code"] == "invalid_api_key"
    assert refused[413]["reason"]["code"] == "request_too_large"
    assert refused[415]["reason"]["code"] == "unsupported_media_type"
    assert refused[400]["reason"]["param"] == "max_tokens"
    assert records[-1]["data"]["answered"] == 17 and records[-1]["data"]["refused"] == 4

    lines = log.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"status":200', b'"status":500', 1)
    log.write_bytes(b"".join(lines))
    with pytest.raises(IntegrityError, match="record 4: content does not match its hash"):
        audit.verify(log)


def test_start_record_names_the_model_by_its_manifest(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text('{"stage": "pretrain", "files": {}}')
    cfg = ServeConfig(model=str(model), port=8123)
    record = start_record(cfg, [KEY])
    assert record["model"] == {
        "path": str(model),
        "manifest": hashlib.sha256((model / "manifest.json").read_bytes()).hexdigest(),
    }
    assert record["api_keys"] == [FP] and record["port"] == 8123
    assert (
        record["config_sha256"] == start_record(ServeConfig(model=str(model), port=8123), [])["config_sha256"]
    )
    assert (
        record["config_sha256"] != start_record(ServeConfig(model=str(model), port=8124), [])["config_sha256"]
    )


def test_no_log_no_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(audit.LOG_ENV, raising=False)
    app = make_app()
    try:
        assert not app.state.audit.enabled
        with BackgroundServer(app) as srv:
            assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        close(app)
    assert list(tmp_path.iterdir()) == []
