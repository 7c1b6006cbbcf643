"""Run untrusted candidate code against unit tests in a throwaway subprocess: the `code` reward of GRPO.

    result = run_tests("def add(a, b):\\n    return a + b", "assert add(2, 3) == 5", timeout_s=5)
    result.passed, result.reason, result.seconds        # True, "passed", 0.04

Each run is a fresh `python -I` in a temporary directory (deleted afterwards) with an empty environment,
stdin at /dev/null, output captured and capped, and rlimits set by the child on itself before the code runs
(`train/sandbox_boot.py`): address space and data segment (`memory_mb`), CPU seconds, file size, no core
dumps, open files, processes (`max_procs`). The parent enforces the wall clock by killing everything.

Isolation is chosen once per process (`isolation()`), strongest first:
- `namespace`: `unshare` puts the child in new network, PID and mount namespaces (no interface but a
  downed loopback; it sees only its own processes in /proc; when its first process exits or is killed,
  the kernel kills the rest). As root the child also runs under a uid of its own, so RLIMIT_NPROC counts
  only its processes and it can neither signal nor read the trainer; as another user it gets a user
  namespace, whose process count starts at zero.
- `process`: a new session only. As root, again a uid of its own (fork limit, kill by uid). As another
  user the fork limit is the user's current task count + `max_procs`, the kill is by process group, and
  the network is blocked only at the Python level (see docs/sandbox.md for what that does not stop).
In both, an audit hook refuses IP sockets and DNS lookups at the Python level too, so a network attempt is
reported as `network` rather than as a connect error.

A crash, a timeout or anything else the code does gives `passed=False` and a reason; `run_tests` never
raises because of the code.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError, DataError

Reason = Literal["passed", "failed", "syntax", "no_code", "timeout", "memory", "network", "crash"]
Mode = Literal["auto", "namespace", "process"]

BOOT_SOURCE = (Path(__file__).with_name("sandbox_boot.py")).read_text(encoding="utf-8")
# Marks every sandbox process's command line (forks keep it): tests and operators can find leftovers.
MARKER = "# lmforge-sandbox"
_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
_UIDS = itertools.count()
_GRACE_S = 0.5  # after the first process exits, how long a forked child may keep the pipes open
_REAP_S = 5.0  # the longest wait for killed processes to disappear


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: Reason
    seconds: float
    detail: str = ""
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Isolation:
    mode: Literal["namespace", "process"]
    own_uid: bool  # runs under a uid of its own (the trainer is root)
    python: str  # the interpreter the sandboxed user can execute


def _sandbox_uid() -> int:
    """A uid no other process uses: per trainer pid and per run, far above any real account."""
    return 600_000_000 + (os.getpid() % 1_000_000) * 256 + next(_UIDS) % 256


def _unshare_prefix(own_uid: bool, uid: int) -> list[str]:
    # Resolve unshare before the child's PATH is emptied.
    exe = shutil.which("unshare") or "unshare"
    common = ["--net", "--pid", "--mount-proc", "--fork", "--kill-child"]
    if own_uid:
        return [exe, *common, "--setuid", str(uid), "--setgid", str(uid)]
    return [exe, "--map-root-user", *common]


def _spawn_kwargs(iso: Isolation, uid: int) -> dict[str, Any]:
    """Popen keywords that switch user (process mode as root); namespace mode switches in unshare."""
    if iso.mode == "process" and iso.own_uid:
        return {"user": uid, "group": uid, "extra_groups": []}
    return {}


def _command(iso: Isolation, uid: int, argv: list[str]) -> list[str]:
    prefix = _unshare_prefix(iso.own_uid, uid) if iso.mode == "namespace" else []
    return [*prefix, iso.python, "-I", *argv]


def _probe(iso: Isolation) -> bool:
    uid = _sandbox_uid()
    try:
        done = subprocess.run(
            _command(iso, uid, ["-c", "pass"]),
            env={},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            **_spawn_kwargs(iso, uid),
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return done.returncode == 0


@cache
def isolation(requested: Mode = "auto", python: str | None = None) -> Isolation:
    """The strongest isolation this machine allows (probed once), or the requested one; ConfigError if none.
    `python`: the interpreter for the code; default the trainer's, else the system's (see the module doc)."""
    own_uid = os.geteuid() == 0 and hasattr(os, "setuid")
    pythons = [python] if python else list(dict.fromkeys([sys.executable, *_PYTHONS]))
    modes: list[Literal["namespace", "process"]] = (
        ["namespace", "process"] if requested == "auto" else [requested]
    )
    for mode in modes:
        for python in pythons:
            iso = Isolation(mode, own_uid, python)
            if Path(python).exists() and _probe(iso):
                return iso
    raise ConfigError(
        f"sandbox isolation={requested}: no interpreter among {pythons} starts"
        + (" under an unprivileged uid" if own_uid else "")
        + (" inside unshare (util-linux) namespaces" if requested == "namespace" else "")
    )


def _run_tag(uid: int) -> str:
    return f"{MARKER} run={uid}\n"


def _live_pids(uid: int, own_uid: bool) -> list[int]:
    """Live (not zombie) processes of one run: by its uid when it has its own, else by the run tag that
    every fork keeps in its command line (a process that execs another program loses it)."""
    tag = _run_tag(uid).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            by_uid = own_uid and re.search(rf"^Uid:\s+{uid}\s", status, re.M) is not None
            ours = by_uid or tag in Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if ours and not re.search(r"^State:\s+Z", status, re.M):
            pids.append(int(entry))
    return pids


def _user_tasks(uid: int) -> int:
    """Tasks (threads count, as RLIMIT_NPROC counts them) that `uid` runs now."""
    total = 0
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if re.search(rf"^Uid:\s+{uid}\s", status, re.M):
            m = re.search(r"^Threads:\s+(\d+)", status, re.M)
            total += int(m.group(1)) if m else 1
    return total


class _Pipes:
    """Reads the child's stdout, stderr and report pipes without blocking, keeping at most `cap` bytes each."""

    def __init__(self, files: list[Any], cap: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.data: dict[int, bytearray] = {}
        self.cap = cap
        for f in files:
            os.set_blocking(f.fileno(), False)
            self.sel.register(f.fileno(), selectors.EVENT_READ)
            self.data[f.fileno()] = bytearray()

    def open(self) -> bool:
        return bool(self.sel.get_map())

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout=max(timeout, 0.0)):
            fd = int(key.fd)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(fd)
                continue
            buf = self.data[fd]
            buf.extend(chunk[: max(self.cap - len(buf), 0)])

    def until(self, deadline: float, proc: subprocess.Popen[bytes] | None) -> bool:
        """Pump until every pipe is closed, or `proc` exited `_GRACE_S` ago; False at the deadline."""
        exited = None
        while self.open():
            now = time.monotonic()
            if now >= deadline:
                return False
            if proc is not None and exited is None and proc.poll() is not None:
                exited = now
            if exited is not None and now - exited > _GRACE_S:
                return True
            self.pump(min(0.05, deadline - now))
        return True


def _kill(proc: subprocess.Popen[bytes], iso: Isolation, uid: int) -> None:
    """Kill the child's process group, reap it, then every process of the run still alive (`_live_pids`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + _REAP_S
    while (pids := _live_pids(uid, iso.own_uid)) and time.monotonic() < end:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _verdict(report: bytes, nonce: str) -> tuple[str, str] | None:
    """(reason, detail) from the child's report line `NONCE REASON DETAIL_HEX`, if it carries our nonce."""
    try:
        got, reason, detail = report.decode("ascii").split("\n", 1)[0].split(" ")
        text = bytes.fromhex(detail).decode("utf-8", "replace")
    except (ValueError, UnicodeDecodeError):
        return None
    return (reason, text) if secrets.compare_digest(got, nonce) else None


def _outcome(verdict: tuple[str, str] | None, timed_out: bool, rc: int | None) -> tuple[Reason, str]:
    if timed_out:
        return "timeout", "wall-clock limit reached"
    if verdict is not None and verdict[0] in get_args(Reason):
        return verdict[0], verdict[1]  # type: ignore[return-value]
    if rc is not None and rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout", "CPU-time limit reached"
    return "crash", f"no verdict; exit status {rc}"


def _limits(memory_mb: int, timeout_s: float, max_procs: int, iso: Isolation, report_fd: int) -> list[str]:
    nproc = max_procs
    if iso.mode == "process" and not iso.own_uid:
        nproc += _user_tasks(os.getuid())  # RLIMIT_NPROC counts every task of this user
    limits = {
        "memory_bytes": memory_mb << 20,
        "cpu_s": math.ceil(timeout_s) + 1,
        "file_bytes": 16 << 20,
        "nproc": nproc,
        "report_fd": report_fd,
    }
    return [f"{k}={v}" for k, v in limits.items()]


def _workdir(code: str, tests: str, iso: Isolation, uid: int) -> Path:
    work = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    # errors="replace": a lone surrogate in generated text must not raise in the trainer
    (work / "solution.py").write_text(code, encoding="utf-8", errors="replace")
    (work / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
    if iso.own_uid:
        for path in (work, work / "solution.py", work / "tests.py"):
            os.chown(path, uid, uid)
    return work


def _spawn(
    iso: Isolation, uid: int, work: Path, limits: list[str], report_fd: int
) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        _command(iso, uid, ["-c", _run_tag(uid) + BOOT_SOURCE, *limits]),
        cwd=work,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(report_fd,),
        start_new_session=True,
        **_spawn_kwargs(iso, uid),
    )


def _supervise(
    proc: subprocess.Popen[bytes], iso: Isolation, uid: int, report: Any, deadline: float, cap: int
) -> tuple[Reason, str, str, str]:
    """Hand the child its nonce, read its pipes until it ends or the deadline, kill what is left, judge."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    nonce = secrets.token_hex(16)
    with contextlib.suppress(OSError):  # the child may die before reading it
        proc.stdin.write(nonce.encode() + b"\n")
        proc.stdin.close()
    pipes = _Pipes([proc.stdout, proc.stderr, report], cap)
    try:
        timed_out = not pipes.until(deadline, proc)
        _kill(proc, iso, uid)
        pipes.until(time.monotonic() + 1.0, None)  # the last output, now that everything is dead
    finally:
        pipes.sel.close()
    reason, detail = _outcome(_verdict(bytes(pipes.data[report.fileno()]), nonce), timed_out, proc.returncode)
    out, err = (bytes(pipes.data[f.fileno()]).decode("utf-8", "replace") for f in (proc.stdout, proc.stderr))
    return reason, detail, out, err


def run_tests(
    code: str,
    tests: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_procs: int = 16,
    output_bytes: int = 64 << 10,
    mode: Mode = "auto",
    python: str | None = None,
) -> SandboxResult:
    """Run `code`, then `tests` (asserts and `test*` functions), in a sandbox; see the module doc."""
    iso = isolation(mode, python)
    uid = _sandbox_uid()
    start = time.monotonic()
    work: Path | None = None
    proc = None
    try:
        work = _workdir(code, tests, iso, uid)
        read_fd, write_fd = os.pipe()
        with os.fdopen(read_fd, "rb") as report:
            try:
                proc = _spawn(
                    iso, uid, work, _limits(memory_mb, timeout_s, max_procs, iso, write_fd), write_fd
                )
            finally:
                os.close(write_fd)  # the child holds its copy; EOF comes when it (and its forks) end
            with proc:  # closes the pipes and reaps the child on the way out
                reason, detail, out, err = _supervise(proc, iso, uid, report, start + timeout_s, output_bytes)
    except OSError as e:  # the machine refused a file, a pipe or a process: score 0, say why, keep training
        if proc is not None:
            _kill(proc, iso, uid)
        reason, detail, out, err = "crash", f"sandbox could not run: {e}", "", ""
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return SandboxResult(reason == "passed", reason, time.monotonic() - start, detail, out, err)


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(completion: str, extract: Literal["fenced", "raw"] = "fenced") -> str | None:
    """The code in a completion: the first ```python (or ```py) block, else the first untagged block;
    None when there is none. `raw` takes the whole completion."""
    if extract == "raw":
        return completion
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    return next((body for lang, body in blocks if not lang), None)


class CodeRewardConfig(Section):
    """`kind: code`: 1.0 when the completion's code passes the row's unit tests in the sandbox, else 0.0."""

    kind: Literal["code"] = Field("code", description="reward kind")
    weight: float = Field(1.0, description="weight of this reward in the sum")
    tests_field: str = Field("tests", description="row field holding the tests (a string or a list of them)")
    timeout_s: float = Field(5.0, gt=0, le=600, description="wall-clock seconds per completion")
    memory_mb: int = Field(512, ge=64, le=1 << 20, description="address-space limit per sandboxed process")
    max_procs: int = Field(16, ge=1, le=4096, description="processes and threads the code may run at once")
    extract: Literal["fenced", "raw"] = Field(
        "fenced", description="fenced: the first ```python block of the completion; raw: all of it"
    )
    workers: int = Field(2, ge=1, le=256, description="sandboxes run at once")
    isolation: Mode = Field(
        "auto", description="auto: namespaces where the kernel allows them, else process; see docs/sandbox.md"
    )
    python: str | None = Field(
        None,
        description="interpreter for the candidate code (null: the trainer's if the sandbox's uid can run it, "
        "else /usr/bin/python3)",
    )


class CodeReward:
    """A GRPO reward: `reward(prompts, completions, rows) -> [1.0 | 0.0, ...]`. The verdicts of the last
    call are in `last_results` (reason and seconds per completion) for metrics."""

    def __init__(
        self,
        tests_field: str = "tests",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        extract: Literal["fenced", "raw"] = "fenced",
        workers: int = 2,
        max_procs: int = 16,
        isolation_mode: Mode = "auto",
        python: str | None = None,
    ) -> None:
        self.tests_field, self.extract, self.workers = tests_field, extract, workers
        self.limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_procs": max_procs}
        self.mode, self.python = isolation_mode, python
        self.isolation = isolation(isolation_mode, python)  # fail at start-up, not at the first batch
        self.last_results: list[SandboxResult] = []

    @classmethod
    def from_config(cls, cfg: CodeRewardConfig) -> CodeReward:
        return cls(
            cfg.tests_field,
            cfg.timeout_s,
            cfg.memory_mb,
            cfg.extract,
            cfg.workers,
            cfg.max_procs,
            cfg.isolation,
            cfg.python,
        )

    def _tests(self, row: dict[str, Any], index: int) -> str:
        value = row.get(self.tests_field)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if not isinstance(value, str):
            raise DataError(
                f"row {index}: field {self.tests_field!r}: expected the unit tests as a string or list of strings"
            )
        return value

    def _one(self, completion: str, tests: str) -> SandboxResult:
        code = extract_code(completion, self.extract)
        if code is None:
            return SandboxResult(False, "no_code", 0.0, "no ```python block in the completion")
        return run_tests(code, tests, mode=self.mode, python=self.python, **self.limits)  # type: ignore[arg-type]

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        if not len(prompts) == len(completions) == len(rows):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(rows)} rows")
        tests = [self._tests(row, i) for i, row in enumerate(rows)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            self.last_results = list(pool.map(self._one, completions, tests))
        return [1.0 if r.passed else 0.0 for r in self.last_results]
