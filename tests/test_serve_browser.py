"""The chat page in a real browser: Debian's headless Chromium (driven by chromedriver through selenium)
loads `/` from a real server, sends a message and shows a streamed answer; with API keys, the key page.

Needs the Debian packages `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver);
skipped with that reason when they are absent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_helpers import BackgroundServer, close, make_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)
KEY = "sk-browser-0123456789"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _chat(driver: Any, message: str, timeout: float = 60) -> Any:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "input")
    box.send_keys(message)
    driver.find_element(By.ID, "send").click()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        bubbles = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if bubbles and bubbles[-1].get_attribute("data-state") in ("done", "error"):
            return bubbles[-1]
        time.sleep(0.1)
    raise AssertionError("no answer within the timeout")


def test_chat_page_streams_an_answer(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    app = make_app(default_max_tokens=16)
    try:
        with BackgroundServer(app) as srv:
            browser.get(srv.url + "/")
            assert browser.title == "lmforge chat"
            for id_, value in [("temperature", "0"), ("max_tokens", "12")]:
                field = browser.find_element(By.ID, id_)
                field.clear()
                field.send_keys(value)
            t0 = time.monotonic()
            while browser.find_element(By.ID, "model").text != "tiny-test" and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            assert browser.find_element(By.ID, "model").text == "tiny-test"  # /v1/models answered
            hint = browser.find_element(By.ID, "hint")  # the empty conversation explains itself
            assert (
                hint.is_displayed()
                and "No messages yet" in hint.text
                and "\u201ctiny-test\u201d" in hint.text
            )
            tokens_before = app.state.batcher.stats.tokens
            answer = _chat(browser, "Hello there")
            assert answer.get_attribute("data-state") == "done", answer.text
            meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
            assert "finish: " in meta
            generated = app.state.batcher.stats.tokens - tokens_before
            assert 1 <= generated <= 12
            assert meta.startswith(f"{generated} tokens")  # the usage chunk of the stream reached the page
            # The streamed text on the page is exactly the (greedy, deterministic) non-streaming answer.
            shown = browser.execute_script("return arguments[0].firstChild.textContent", answer)
            body = {
                "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 12,
                "temperature": 0,
            }
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                expected = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"][
                    "content"
                ]
            assert shown == expected and len(shown) > 0
            assert not browser.find_elements(By.CSS_SELECTOR, ".fb")  # feedback is off: no controls
            assert not browser.find_element(By.ID, "feedback-note").is_displayed()
            users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
            assert [u.text for u in users] == ["Hello there"]
            # A second turn sends the history along: the prompt is longer than the first one's.
            answer2 = _chat(browser, "And again")
            assert answer2.get_attribute("data-state") == "done"
            assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
            assert not browser.find_elements(By.ID, "hint")  # gone once there are messages
            browser.find_element(By.ID, "clear").click()
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
            assert "No messages yet" in browser.find_element(By.ID, "hint").text  # back after clear
    finally:
        close(app)


def _wait_text(element: Any, text: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while text not in element.text and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    assert text in element.text, element.text


def test_chat_page_records_feedback(browser: Any, tmp_path: Path) -> None:
    """With feedback on: the page says so, a thumbs up and a comparison land in the log on disk."""
    from selenium.webdriver.common.by import By

    log = tmp_path / "feedback.jsonl"
    app = make_app(default_max_tokens=12, feedback={"enabled": True, "path": str(log)})
    try:
        with BackgroundServer(app) as srv:
            browser.get(srv.url + "/")
            note = browser.find_element(By.ID, "feedback-note")
            assert note.is_displayed() and "recorded" in note.text
            field = browser.find_element(By.ID, "temperature")
            field.clear()
            field.send_keys("0")
            answer = _chat(browser, "Hello there")
            assert answer.get_attribute("data-state") == "done", answer.text
            shown = browser.execute_script("return arguments[0].firstChild.textContent", answer)
            answer.find_element(By.CSS_SELECTOR, ".fb-up").click()
            status = answer.find_element(By.CSS_SELECTOR, ".fb-status")
            _wait_text(status, "feedback recorded")
            [up] = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
            assert (up["kind"], up["rating"], up["answer"], up["model"]) == (
                "rating",
                "up",
                shown,
                "tiny-test",
            )
            assert up["messages"] == [{"role": "user", "content": "Hello there"}]
            # compare: two samples at temperature 1 (greedy would repeat itself); pick B
            answer.find_element(By.CSS_SELECTOR, ".fb-compare").click()
            _wait_text(status, "which answer is better?")
            options = answer.find_elements(By.CSS_SELECTOR, ".fb-option")
            options[1].find_element(By.CSS_SELECTOR, ".fb-pick").click()
            _wait_text(status, "feedback recorded")
            records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
            assert len(records) == 2 and records[1]["kind"] == "comparison" and records[1]["choice"] == 1
            texts = browser.execute_script(
                "return [...arguments[0]].map(o => o.firstChild.textContent.slice(0, -1))", options
            )
            assert records[1]["answers"] == texts and texts[0] != texts[1]
            assert "chosen" in (options[1].get_attribute("class") or "")
    finally:
        close(app)


def test_chat_page_behind_api_keys(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    app = make_app(keys=[KEY], default_max_tokens=8)
    try:
        with BackgroundServer(app) as srv:
            browser.get(srv.url + "/")
            assert "needs an API key" in browser.page_source  # the 401 page, nothing of the chat
            browser.find_element(By.ID, "k").send_keys("sk-wrong-000000000")
            browser.find_element(By.TAG_NAME, "button").click()
            time.sleep(0.5)
            assert browser.find_element(By.ID, "e").text == "wrong key"
            field = browser.find_element(By.ID, "k")
            field.clear()
            field.send_keys(KEY)
            browser.find_element(By.TAG_NAME, "button").click()
            t0 = time.monotonic()
            while not browser.find_elements(By.ID, "send") and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            answer = _chat(browser, "Hi")
            assert answer.get_attribute("data-state") == "done", answer.text
    finally:
        close(app)
