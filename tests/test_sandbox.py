"""The code sandbox of the GRPO `code` reward: verdicts, and hostile code that must score 0 within the time
limit while the calling process (the trainer) keeps running. Runs under every isolation mode this machine
allows (`namespace` needs unshare and a kernel that permits namespaces; `process` always works)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydantic
import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.train import sandbox
from lmforge.train.sandbox import CodeReward, CodeRewardConfig, extract_code, run_tests

TIMEOUT = 1.5
MARGIN = 1.5  # kill, reap and interpreter start-up on a loaded 2-core machine


def _available(mode: str) -> bool:
    try:
        sandbox.isolation(mode)  # type: ignore[arg-type]
    except ConfigError:
        return False
    return True


MODES = [
    pytest.param(m, marks=pytest.mark.skipif(not _available(m), reason=f"isolation={m} unavailable here"))
    for m in ("namespace", "process")
]


def _sandbox_processes() -> list[int]:
    """Live processes started by any sandbox: forks keep the marker in their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if sandbox.MARKER.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


class _Trainer:
    """A thread that keeps counting while a sandbox runs: proof the parent was neither killed nor starved."""

    def __init__(self) -> None:
        self.ticks = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.ticks += 1
            time.sleep(0.01)

    def __enter__(self) -> _Trainer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _hostile(code: str, mode: str) -> sandbox.SandboxResult:
    """Run hostile code; assert it scored 0 in time, left nothing behind and the trainer goes on."""
    with _Trainer() as trainer:
        start = time.monotonic()
        result = run_tests(code, "assert True", timeout_s=TIMEOUT, memory_mb=256, max_procs=16, mode=mode)  # type: ignore[arg-type]
        wall = time.monotonic() - start
    assert not result.passed
    assert wall < TIMEOUT + MARGIN, (wall, result)
    assert trainer.ticks > 10 * wall  # ~100 ticks/s when the parent is not starved; 10/s is the floor
    assert _sandbox_processes() == []
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0  # the trainer can still fork
    again = run_tests("def f():\n    return 1", "assert f() == 1", timeout_s=5, mode=mode)  # type: ignore[arg-type]
    assert again.passed, again
    return result


@pytest.mark.parametrize("mode", MODES)
def test_verdicts_pass_fail_syntax(mode: str) -> None:
    code = "def add(a, b):\n    return a + b\n"
    ok = run_tests(code, "assert add(2, 3) == 5\ndef test_neg():\n    assert add(-1, 1) == 0", mode=mode)  # type: ignore[arg-type]
    assert (ok.passed, ok.reason) == (True, "passed")
    bad = run_tests(code, "def test_wrong():\n    assert add(2, 2) == 5", mode=mode)  # type: ignore[arg-type]
    assert (bad.passed, bad.reason) == (False, "failed")
    assert "AssertionError" in bad.detail
    syntax = run_tests("def add(a, b) return a + b", "assert add(2, 3) == 5", mode=mode)  # type: ignore[arg-type]
    assert (syntax.passed, syntax.reason) == (False, "syntax")


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_scores_zero(mode: str) -> None:
    result = _hostile("while True:\n    pass\n", mode)
    assert result.reason == "timeout"
    assert TIMEOUT <= result.seconds < TIMEOUT + MARGIN


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_scores_zero(mode: str) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = _hostile(bomb, mode)
    assert result.reason == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_fork_limit_counts_the_run_alone(mode: str) -> None:
    # Forks until the kernel refuses: the count is bounded by max_procs (the interpreter itself is one task).
    code = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
    code += "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('forks', n, e.errno, flush=True)\n"
    code += "raise SystemExit(1)\n"
    result = _hostile(code, mode)
    words = result.stdout.split()
    assert words[0] == "forks" and words[2] == "11", result  # EAGAIN
    slack = 8 if mode == "process" and os.geteuid() != 0 else 0  # the user's other processes come and go
    assert 8 <= int(words[1]) <= 16 - 1 + slack, result
    assert result.reason == "failed"


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_escaping_its_session_is_killed(mode: str) -> None:
    # Children that leave the process group (setsid) must still die with the sandbox.
    code = "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
    code += "time.sleep(60)\n"
    assert _hostile(code, mode).reason == "timeout"


@pytest.mark.parametrize("mode", MODES)
def test_ten_gb_allocation_scores_zero(mode: str) -> None:
    result = _hostile("block = bytearray(10 * 1024**3)\n", mode)
    assert result.reason == "memory"
    assert result.seconds < TIMEOUT


@pytest.mark.parametrize("mode", MODES)
def test_network_call_scores_zero_and_reaches_nothing(mode: str) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        result = _hostile(code, mode)
        assert result.reason == "network"
        assert (
            _hostile(code.replace("socket.socket()", "socket.socket.__mro__[1]()"), mode).reason == "network"
        )
        if mode == "namespace":  # the real boundary: libc's connect, past the audit hook, reaches nothing
            raw = (
                "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
            )
            raw += f"addr = struct.pack('<H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
            raw += "assert libc.connect(fd, addr, 16) == 0, ctypes.get_errno()\n"
            bypass = _hostile(raw, mode)
            assert bypass.reason == "failed" and "AssertionError: 101" in bypass.detail, bypass  # ENETUNREACH
        time.sleep(0.2)
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_invisible(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "process" and os.geteuid() != 0:
        pytest.skip("process isolation as a non-root user shares the uid: /proc/PID/environ is readable")
    secret = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("LMFORGE_FAKE_API_KEY", secret)
    # A process started with the key in its environment, as a trainer would be: /proc/PID/environ holds it.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=dict(os.environ))
    try:
        time.sleep(0.2)
        assert secret.encode() in Path(f"/proc/{holder.pid}/environ").read_bytes()
        code = "import glob, os\nprint(sorted(os.environ))\n"
        tests = "assert 'LMFORGE_FAKE_API_KEY' not in os.environ\nleaked = []\n"
        tests += "for path in glob.glob('/proc/[0-9]*/environ'):\n    try:\n        data = open(path, 'rb').read()\n"
        tests += f"    except OSError:\n        continue\n    if {secret.encode()!r} in data:\n        leaked.append(path)\n"
        tests += "assert not leaked, leaked\n"
        result = run_tests(code, tests, mode=mode)  # type: ignore[arg-type]
        assert result.passed, result
        assert secret not in result.stdout
        assert "LMFORGE_FAKE_API_KEY" not in result.stdout and "PATH" in result.stdout
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("mode", MODES)
def test_early_exit_and_fake_verdict_do_not_pass(mode: str) -> None:
    fake = 'import os, sys\nprint(\'{"nonce": "0", "reason": "passed"}\')\nos._exit(0)\n'
    assert run_tests(fake, "assert False", mode=mode).reason == "crash"  # type: ignore[arg-type]
    assert run_tests("import sys\nsys.exit(0)\n", "assert False", mode=mode).reason == "failed"  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_output_capped_and_workdir_removed(mode: str) -> None:
    code = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nprint('y' * 3_000_000)\n"
    result = run_tests(code, "assert True", output_bytes=4096, mode=mode)  # type: ignore[arg-type]
    assert result.passed, result
    assert len(result.stdout) == 4096
    workdir = Path(result.stdout.splitlines()[0])
    assert workdir.name.startswith("lmforge-sandbox-") and not workdir.exists()


def test_odd_text_never_raises_and_no_fd_leaks() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    assert run_tests("x = 1\x00", "assert True").reason == "syntax"
    assert run_tests("x = '\ud800'", "assert x == '?'").passed  # a lone surrogate is replaced, not raised
    assert run_tests("print('\u00e9' * 3)", "").stdout == "\u00e9\u00e9\u00e9\n"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_extract_code() -> None:
    text = "Here:\n```text\nnot code\n```\n```python\ndef f():\n    return 2\n```\n```py\nother\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code at all") is None
    assert extract_code("x = 1", "raw") == "x = 1"


def test_code_reward_scores_concurrently() -> None:
    reward = CodeReward(timeout_s=TIMEOUT, workers=4)
    good = "```python\ndef sq(x):\n    return x * x\n```"
    rows = [{"tests": "assert sq(3) == 9"}, {"tests": ["assert sq(2) == 4", "assert sq(0) == 0"]}]
    completions = [good, good, "```python\ndef sq(x):\n    return x + x\n```", "I cannot do that."]
    rows += [{"tests": "assert sq(3) == 9"}, {"tests": "assert sq(3) == 9"}]
    assert reward(["p"] * 4, completions, rows) == [1.0, 1.0, 0.0, 0.0]
    assert [r.reason for r in reward.last_results] == ["passed", "passed", "failed", "no_code"]
    loop = "```python\nwhile True:\n    pass\n```"
    start = time.monotonic()
    assert reward(["p"] * 4, [loop] * 4, [{"tests": ""}] * 4) == [0.0] * 4
    assert time.monotonic() - start < 2 * TIMEOUT + MARGIN  # four 1.5 s timeouts ran side by side
    with pytest.raises(DataError, match="row 0: field 'tests'"):
        reward(["p"], [good], [{"test": "assert True"}])


def test_code_reward_config() -> None:
    cfg = CodeRewardConfig.model_validate(
        {"kind": "code", "weight": 0.5, "timeout_s": 2, "tests_field": "checks"}
    )
    reward = CodeReward.from_config(cfg)
    assert (reward.tests_field, reward.limits["timeout_s"], reward.workers) == ("checks", 2, 2)
    with pytest.raises(ConfigError, match=r"no interpreter among \['/nonexistent/python3'\]"):
        CodeReward.from_config(CodeRewardConfig(python="/nonexistent/python3"))
    chosen = CodeReward.from_config(CodeRewardConfig(python=sandbox.isolation().python))
    assert chosen([""], ["```python\nimport sys\nprint(sys.executable)\n```"], [{"tests": ""}]) == [1.0]
    assert chosen.last_results[0].stdout.strip() == sandbox.isolation().python
    with pytest.raises(pydantic.ValidationError):
        CodeRewardConfig.model_validate({"kind": "code", "timout_s": 2})
    with pytest.raises(pydantic.ValidationError):
        CodeRewardConfig.model_validate({"kind": "code", "timeout_s": 0})


def test_shipped_code_tasks_are_solvable() -> None:
    """configs/rl/data/code-tasks.jsonl: each row's reference solution passes its tests, a wrong one fails."""
    path = Path(__file__).resolve().parents[1] / "configs/rl/data/code-tasks.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "tests", "solution"} <= set(r) for r in rows)
    reward = CodeReward(workers=2)
    prompts = [r["prompt"] for r in rows]
    assert reward(prompts, [f"```python\n{r['solution']}```" for r in rows], rows) == [1.0] * 8
    wrong = [f"```python\n{r['solution'].replace('return', 'return None and')}```" for r in rows]
    assert reward(prompts, wrong, rows) == [0.0] * 8


def test_code_kind_in_the_grpo_rewards_list() -> None:
    """`{kind: code}` in align grpo's rewards: weighted, named, and an infinite loop scores 0, not an error."""
    from lmforge.train.rewards import build_rewards, score

    rewards = build_rewards([{"kind": "code", "weight": 2.0, "timeout_s": 1.5, "extract": "raw"}])
    rows = [{"tests": "assert add(2, 3) == 5"}] * 3
    good, bad, loop = (
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b",
        "while True: pass",
    )
    totals, per = score(rewards, ["p"] * 3, [good, bad, loop], rows)
    assert per == {"code": [1.0, 0.0, 0.0]} and totals == [2.0, 0.0, 0.0]
