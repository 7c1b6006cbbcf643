"""`lmforge serve PATH` as users run it: the real CLI in a child process, a saved Hugging Face folder, keys
from a file, the official `openai` client over loopback (slow: the child imports torch and loads the model)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lmforge.model.hf import save_hf
from serve_helpers import tiny_model

KEY = "sk-cli-0123456789abcdef"


@pytest.mark.slow
def test_cli_serves_a_saved_model(tmp_path: Path) -> None:
    model, tok = tiny_model()
    folder = tmp_path / "tiny-hf"
    save_hf(model, folder)
    tok.save(folder)
    (tmp_path / "keys.txt").write_text(f"# one per line\n{KEY}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LMFORGE_API_KEYS": ""}
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        str(folder),
        f"port={port}",
        f"api_keys_file={tmp_path / 'keys.txt'}",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-hf"]
        r = client.completions.create(model="tiny-hf", prompt="Hark", max_tokens=5, temperature=0)
        assert r.usage is not None and r.usage.completion_tokens <= 5
        chunks = list(
            client.chat.completions.create(
                model="tiny-hf", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-nope-000000000", max_retries=0).models.list()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # One log line per request; no prompt text, no key.
    assert "POST /v1/completions 200" in out and "key-" in out
    assert "Hark" not in out and KEY not in out
