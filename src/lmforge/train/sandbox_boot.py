"""The child side of the code sandbox: `train/sandbox.py` runs this file's source as `python -I -c SOURCE
KEY=VALUE...` in a fresh interpreter (standard library only: the interpreter may not see lmforge).

It reads a one-line nonce from stdin (then stdin is /dev/null), applies the resource limits to itself,
installs an audit hook that refuses IP sockets and name lookups, runs the candidate code as module
`solution` and the tests in the same namespace (top-level asserts, then every `test*` function the tests
define), and writes one line `NONCE REASON DETAIL_HEX` to the report pipe. A report without the nonce is not
trusted, so code that exits early or prints a fake verdict does not pass.

It imports only built-in modules (no json, socket, traceback: those would add ~25 ms of start-up per
completion; the code may still import them).
"""

from __future__ import annotations

import _signal
import builtins
import os
import resource
import sys
from typing import Any

# Linux address families: AF_INET, AF_INET6, AF_PACKET (the values, so that `socket` need not be imported).
_NET_FAMILIES = (2, 10, 17)
_LOOKUPS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")
_ADDRESSED = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")


def _set_limits(limits: dict[str, int]) -> None:
    """Hard limits equal to the soft ones, so the code cannot raise them back."""
    mem, cpu, files = limits["memory_bytes"], limits["cpu_s"], limits["file_bytes"]
    pairs = {
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_DATA: (mem, mem),
        resource.RLIMIT_FSIZE: (files, files),
        resource.RLIMIT_NOFILE: (256, 256),
        resource.RLIMIT_NPROC: (limits["nproc"], limits["nproc"]),
    }
    for kind, value in pairs.items():
        resource.setrlimit(kind, value)
    # A write past RLIMIT_FSIZE raises OSError (EFBIG) in the code instead of killing it.
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)


def _block_network(attempts: list[str]) -> None:
    """An audit hook (which the code cannot remove) refusing IP and packet sockets, connects, binds and
    sends to IP addresses, and DNS lookups; each attempt is recorded. Unix sockets still work."""

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not event.startswith("socket."):
            return
        if event == "socket.__new__":
            blocked = args[1] in _NET_FAMILIES or args[1] == -1  # -1: the default, AF_INET
        else:
            blocked = event in _LOOKUPS or (event in _ADDRESSED and isinstance(args[1], tuple))
        if blocked:
            attempts.append(f"{event}{args[1:3]!r}"[:200])
            raise PermissionError("network access is disabled in the sandbox")

    sys.addaudithook(hook)


def _run(code: str, tests: str) -> tuple[str, str]:
    """(reason, detail) of running the code then the tests in one module namespace."""
    try:
        code_obj = compile(code, "solution.py", "exec")
        tests_obj = compile(tests, "tests.py", "exec")
    except (SyntaxError, ValueError) as e:
        return "syntax", f"{type(e).__name__}: {e}"
    module = type(sys)("solution")
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
        sys.__excepthook__(type(e), e, e.__traceback__)  # the traceback on stderr, printed in C
        return "failed", f"{type(e).__name__}: {str(e)[:300]}"
    return "passed", ""


def main() -> None:
    nonce = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    limits = {k: int(v) for k, v in (arg.split("=", 1) for arg in sys.argv[1:])}
    report = os.fdopen(limits.pop("report_fd"), "w", encoding="utf-8")
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
    report.write(f"{nonce} {reason} {detail.encode('utf-8', 'replace').hex()}\n")
    report.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
