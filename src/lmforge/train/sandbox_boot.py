"""The child side of the code sandbox: `train/sandbox.py` runs this file's source as `python -I -c SOURCE
LIMITS_JSON` in a fresh interpreter (standard library only: the interpreter may not see lmforge).

It reads a one-line nonce from stdin (then stdin is /dev/null), applies the resource limits to itself,
blocks IP sockets and name lookups at the Python level, runs the candidate code as module `solution` and the
tests in the same namespace (top-level asserts, then every `test*` function the tests define), and writes one
JSON line `{"nonce", "reason", "detail"}` to the report pipe. A report without the nonce is not trusted, so
code that exits early or prints a fake verdict to stdout does not pass.
"""

from __future__ import annotations

import _socket
import builtins
import json
import os
import resource
import signal
import socket
import sys
import traceback
import types
from typing import Any

_NET_FAMILIES = {socket.AF_INET, socket.AF_INET6} | (
    {socket.AF_PACKET} if hasattr(socket, "AF_PACKET") else set()
)


def _set_limits(limits: dict[str, Any]) -> None:
    """Hard limits equal to the soft ones, so the code cannot raise them back."""
    mem = int(limits["memory_bytes"])
    cpu = int(limits["cpu_s"])
    pairs = {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_DATA: (mem, mem),
        resource.RLIMIT_FSIZE: (int(limits["file_bytes"]), int(limits["file_bytes"])),
        resource.RLIMIT_NOFILE: (256, 256),
        resource.RLIMIT_NPROC: (int(limits["nproc"]), int(limits["nproc"])),
    }
    for kind, value in pairs.items():
        resource.setrlimit(kind, value)
    # A write past RLIMIT_FSIZE raises OSError (EFBIG) in the code instead of killing it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _block_network(attempts: list[str]) -> None:
    """Refuse IP (and raw packet) sockets and DNS lookups; record each attempt. Unix sockets still work."""
    original = socket.socket

    class BlockedSocket(original):  # type: ignore[misc, valid-type]
        def __init__(self, family: int = -1, type: int = -1, proto: int = 0, fileno: Any = None) -> None:
            if fileno is None and (socket.AF_INET if family == -1 else family) in _NET_FAMILIES:
                attempts.append(f"socket(family={family})")
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    def refuse(name: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name}{args[:2]}")
            raise PermissionError("network access is disabled in the sandbox")

        return blocked

    socket.socket = BlockedSocket  # type: ignore[misc]
    socket.SocketType = BlockedSocket
    _socket.socket = BlockedSocket  # type: ignore[misc]
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, refuse(name))
        setattr(_socket, name, refuse(name))


def _run(code: str, tests: str) -> tuple[str, str]:
    """(reason, detail) of running the code then the tests in one module namespace."""
    try:
        code_obj = compile(code, "solution.py", "exec")
        tests_obj = compile(tests, "tests.py", "exec")
    except (SyntaxError, ValueError) as e:
        return "syntax", f"{type(e).__name__}: {e}"
    module = types.ModuleType("solution")
    module.__dict__["__builtins__"] = builtins
    sys.modules["solution"] = module
    try:
        exec(code_obj, module.__dict__)
        exec(tests_obj, module.__dict__)
        for name, fn in list(module.__dict__.items()):
            test_code = getattr(fn, "__code__", None)
            if name.startswith("test") and test_code is not None and test_code.co_filename == "tests.py":
                fn()
    except MemoryError:
        return "memory", "MemoryError"
    except BaseException as e:  # the verdict covers everything the code can raise, SystemExit too
        traceback.print_exc()
        return "failed", f"{type(e).__name__}: {str(e)[:300]}"
    return "passed", ""


def main() -> None:
    nonce = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    limits = json.loads(sys.argv[1])
    report = os.fdopen(int(limits["report_fd"]), "w", encoding="utf-8")
    with open("solution.py", encoding="utf-8") as f:
        code = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    sys.path.insert(0, os.getcwd())
    attempts: list[str] = []
    _set_limits(limits)
    _block_network(attempts)
    reason, detail = _run(code, tests)
    if attempts:
        reason, detail = "network", "; ".join(attempts)[:300]
    report.write(json.dumps({"nonce": nonce, "reason": reason, "detail": detail}) + "\n")
    report.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
