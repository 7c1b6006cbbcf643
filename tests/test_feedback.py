"""Human feedback: POST /v1/feedback (strict validation, 404 when off, keys, durable one-line records that
survive a kill -9 of the real `lmforge serve`, under -m slow) and `lmforge data feedback` (log -> exactly
the expected preference pairs, which align dpo's loader accepts)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmforge.cli import main as cli_main
from lmforge.data.feedback import read_log
from lmforge.data.preference import load_pairs
from lmforge.errors import DataError
from lmforge.model.hf import save_hf
from lmforge.serve.auth import fingerprint
from lmforge.serve.feedback import FeedbackLog
from serve_helpers import BackgroundServer, close, make_app, tiny_model

KEY = "sk-feedback-0123456789abcdef"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def rating(answer: str, up: bool, **extra: Any) -> dict[str, Any]:
    return {"kind": "rating", "messages": CHAT, "answer": answer, "rating": "up" if up else "down", **extra}


def comparison(a: str, b: str, choice: int, prompt: str = "2+3=") -> dict[str, Any]:
    return {"kind": "comparison", "prompt": prompt, "answers": [a, b], "choice": choice}


def read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # a child process imports torch and loads a model: 5-35 s
def test_records_survive_kill_9_of_the_server(tmp_path: Path) -> None:
    model, tok = tiny_model()
    folder = tmp_path / "tiny-hf"
    save_hf(model, folder)
    tok.save(folder)
    log = tmp_path / "fb" / "feedback.jsonl"
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(folder), f"port={port}"]
    cmd += ["feedback.enabled=true", f"feedback.path={log}", "requests_per_minute=0"]
    env = {**os.environ, "LMFORGE_API_KEYS": KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        events = [rating(f"answer {i} \u00e9\u4e2d", i % 2 == 0, request_id=f"r{i}") for i in range(30)]
        events += [comparison(f"{i}", f"{i + 1}", i % 2) for i in range(30)]
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda e: client.post(url + "/v1/feedback", json=e, headers=auth), events)
            )
        proc.send_signal(signal.SIGKILL)  # right after the last answer: no shutdown, no flush at exit
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert [r.status_code for r in answers] == [200] * 60
    records = read_records(log)
    assert len(records) == 60
    assert sorted(r["id"] for r in records) == sorted(a.json()["id"] for a in answers)
    by_request = {r["request_id"]: r for r in records if r["kind"] == "rating"}
    assert by_request["r7"]["answer"] == "answer 7 \u00e9\u4e2d" and by_request["r7"]["rating"] == "down"
    assert by_request["r7"]["messages"] == CHAT and by_request["r7"]["model"] == "tiny-hf"
    assert all(r["key"] == fingerprint(KEY) for r in records)
    assert KEY not in log.read_text(encoding="utf-8")
    assert oct(log.stat().st_mode & 0o777) == "0o600"


MALFORMED = [
    (b'{"kind": "rating", "prompt": "x", ', None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (rating("a", True) | {"answer": None}, "answer", "valid string"),
    ({"kind": "rating", "prompt": "x", "answer": "a"}, "rating", "Field required"),
    ({"prompt": "x", "answer": "a", "rating": "up"}, "kind", "expected 'rating' or 'comparison'"),
    (rating("a", True) | {"rating": "meh"}, "rating", "'up' or 'down'"),
    (rating("a", True) | {"rating": 1}, "rating", "'up' or 'down'"),
    (comparison("a", "b", 2), "choice", "less than or equal to 1"),
    (comparison("a", "b", 0) | {"choice": True}, "choice", "valid integer"),
    (comparison("a", "b", 0) | {"choice": "1"}, "choice", "valid integer"),
    (comparison("a", "b", 0) | {"answers": ["a"]}, "answers", "at least 2"),
    (comparison("a", "a", 0), "answers", "identical"),
    (comparison("a", "b", 0) | {"messages": CHAT}, "prompt", "exactly one"),
    ({"kind": "rating", "answer": "a", "rating": "up"}, "prompt", "exactly one"),
    (rating("a", True) | {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string"),
    (rating("a", True) | {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input"),
    (rating("a", True) | {"messages": [*CHAT, {"role": "assistant", "content": "x"}]}, "messages", "last"),
    (rating("a", True) | {"api_key": KEY}, "api_key", "Extra inputs are not permitted"),
    (rating("x" * 201, True), "answer", "201 characters; at most 200"),
    (comparison("a", "b" * 201, 0), "answers[1]", "at most 200"),
    (rating("\ud800", True), "answer", "unable to parse raw data as a unicode string"),
]


def test_malformed_feedback_gets_400_naming_the_field(tmp_path: Path) -> None:
    log = tmp_path / "feedback.jsonl"
    app = make_app(feedback={"enabled": True, "path": str(log), "max_chars": 200}, max_body_bytes=2048)
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url) as client:
            for body, param, message in MALFORMED:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = client.post("/v1/feedback", content=raw, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (body, r.text)
                err = r.json()["error"]
                assert err["param"] == param and message in err["message"], (body, err)
            big = client.post("/v1/feedback", json=rating("x" * 3000, True))
            assert big.status_code == 413
            wrong_model = client.post("/v1/feedback", json=rating("a", True, model="other"))
            assert wrong_model.status_code == 404 and wrong_model.json()["error"]["code"] == "model_not_found"
            assert client.post("/v1/feedback", content=b"{}").status_code == 415
            ok = client.post("/v1/feedback", json=rating("blue", True, model="tiny-test"))
            assert ok.status_code == 200 and ok.json()["recorded"] is True
    finally:
        close(app)
    records = read_records(log)  # only the one valid event was written
    assert len(records) == 1 and records[0]["answer"] == "blue" and records[0]["key"] is None
    assert set(records[0]) == {
        "id",
        "time",
        "kind",
        "model",
        "request_id",
        "key",
        "messages",
        "answer",
        "rating",
    }


def test_feedback_off_is_404_and_page_unchanged(tmp_path: Path) -> None:
    app = make_app()
    try:
        with BackgroundServer(app) as srv:
            r = httpx.post(srv.url + "/v1/feedback", json=rating("a", True))
            assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_disabled"
            page = httpx.get(srv.url + "/").text
            assert "<body>" in page and "<body data-feedback" not in page
    finally:
        close(app)
    assert not list(tmp_path.iterdir())


def test_feedback_needs_the_key_and_never_records_it(tmp_path: Path) -> None:
    log = tmp_path / "feedback.jsonl"
    app = make_app(keys=[KEY], feedback={"enabled": True, "path": str(log)})
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url) as client:
            assert client.post("/v1/feedback", json=rating("a", True)).status_code == 401
            bad = {"Authorization": "Bearer sk-wrong-000000000000"}
            assert client.post("/v1/feedback", json=rating("a", True), headers=bad).status_code == 401
            good = {"Authorization": f"Bearer {KEY}"}
            assert client.post("/v1/feedback", json=rating("a", True), headers=good).status_code == 200
            page = client.get("/", headers=good).text
            assert '<body data-feedback="on">' in page and "Feedback is on" in page
    finally:
        close(app)
    text = log.read_text(encoding="utf-8")
    assert KEY not in text and "sk-wrong" not in text
    assert [r["key"] for r in read_records(log)] == [fingerprint(KEY)]


def test_concurrent_events_never_interleave(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    texts = [f"{i:03d}:" + "y" * (i * 997 % 50_000) for i in range(200)]  # lines up to 50 kB
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: log.append({"answer": t}), texts))
    log.close()
    assert sorted(r["answer"] for r in read_records(tmp_path / "feedback.jsonl")) == sorted(texts)


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"kind": "rating"}\n{"kind": "rat', encoding="utf-8")  # a crash mid-write
    log = FeedbackLog(path)
    log.append({"kind": "comparison"})
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ['{"kind": "rating"}', '{"kind": "rat', '{"kind":"comparison"}']


def write_log(path: Path, events: list[Any]) -> None:
    lines = [e if isinstance(e, str) else json.dumps({"model": "m1", **e}) for e in events]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


KNOWN_LOG: list[Any] = [
    comparison("5", "6", 0),  # 5 over 6
    comparison("6", "5", 1),  # again 5 over 6: one pair
    comparison("5", "7", 1),  # 7 over 5 ...
    comparison("7", "5", 1),  # ... and 5 over 7: a tie, no pair
    rating("red", True),
    rating("banana", False),
    rating("blue", True),
    rating("blue", False),  # blue: +1 -1 = 0, unpaired
    rating("green", True),
    rating("banana", False),
    {"kind": "rating", "prompt": "2+3=", "answer": "6", "rating": "up"},  # 5 vs 6 decided by comparison
    {"kind": "rating", "prompt": "2+3=", "answer": "5", "rating": "down"},
    {"kind": "rating", "prompt": "2+3=", "answer": "9", "rating": "down"},  # 6 (+1) over 9 (-1)
    {"kind": "rating", "prompt": "Hi", "answer": "Hello", "rating": "up"},  # only ups: unpaired
    {**comparison("a", "b", 0, prompt="other model"), "model": "m2"},
]
EXPECTED = [
    {"prompt": "2+3=", "chosen": "5", "rejected": "6"},
    {"prompt": "2+3=", "chosen": "6", "rejected": "9"},
    {"prompt": CHAT, "chosen": "red", "rejected": "banana"},
    {"prompt": CHAT, "chosen": "green", "rejected": "banana"},
]


def test_data_feedback_gives_exactly_the_expected_pairs(tmp_path: Path) -> None:
    write_log(tmp_path / "fb.jsonl", KNOWN_LOG)
    out = tmp_path / "pairs"
    assert cli_main(["data", "feedback", f"input={tmp_path / 'fb.jsonl'}", f"output={out}", "model=m1"]) == 0
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == EXPECTED
    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ("events", "ratings", "comparisons", "other_model", "prompts")} == {
        "events": 14,
        "ratings": 10,
        "comparisons": 4,
        "other_model": 1,
        "prompts": 3,
    }
    assert (report["pairs"], report["pairs_from_comparisons"], report["pairs_from_ratings"]) == (4, 1, 3)
    assert (report["tied_comparisons"], report["tied_ratings"], report["unpaired_rated_prompts"]) == (1, 1, 1)
    assert (out / "manifest.json").is_file()
    _, tok = tiny_model()  # align dpo's loader reads the output: plain and chat pairs
    pairs, stats = load_pairs(out / "pairs.jsonl", tok, max_len=128, max_prompt_len=64)
    assert (len(pairs), stats.records, stats.chat, stats.identical) == (4, 4, 2, 0)


def test_data_feedback_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "fb.jsonl"
    write_log(
        log, [comparison("5", "6", 0), '{"kind": "comparison", "prompt": "2+3=", "ans', rating("x", True)]
    )
    assert cli_main(["data", "feedback", f"input={log}", f"output={tmp_path / 'a'}"]) == 2
    assert f"{log}:2: not valid JSON (skip_bad=true skips malformed lines)" in capsys.readouterr().err
    write_log(log, [comparison("5", "6", 0), {"kind": "comparison", "prompt": "p", "answers": ["a", "b"]}])
    with pytest.raises(DataError, match=r"fb.jsonl:2: 'choice' must be 0 or 1"):
        read_log(log, None, skip_bad=False)
    write_log(log, [comparison("5", "6", 0), "not json", '["a"]', rating("x", True)])
    out = tmp_path / "b"
    assert cli_main(["data", "feedback", f"input={log}", f"output={out}", "skip_bad=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["bad_lines"], report["bad_line_numbers"], report["pairs"]) == (2, [2, 3], 1)
    write_log(log, [rating("x", True)])
    assert cli_main(["data", "feedback", f"input={log}", f"output={tmp_path / 'c'}"]) == 2
    assert "no preference pairs (1 events" in capsys.readouterr().err


def test_a_failing_disk_is_a_503_and_the_server_lives_on(tmp_path: Path) -> None:
    app = make_app(feedback={"enabled": True, "path": str(tmp_path / "feedback.jsonl")})
    try:
        with BackgroundServer(app) as srv:
            os.close(app.state.feedback._fd)  # the descriptor gone: every write fails with EBADF
            app.state.feedback._fd = os.open(os.devnull, os.O_RDONLY)
            r = httpx.post(srv.url + "/v1/feedback", json=rating("a", True))
            assert r.status_code == 503 and "not be recorded" in r.json()["error"]["message"]
            assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        close(app)


@pytest.mark.slow  # a child process imports torch and loads a model: 5-35 s
def test_serve_refuses_an_unwritable_feedback_path_before_loading(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cmd = [sys.executable, "-m", "lmforge", "serve", str(tmp_path / "no-model"), "feedback.enabled=true"]
    cmd.append(f"feedback.path={tmp_path / 'file' / 'x.jsonl'}")
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LMFORGE_API_KEYS": ""},
    )
    assert proc.returncode == 2
    assert f"feedback.path {tmp_path / 'file' / 'x.jsonl'}: cannot open for appending" in proc.stderr
