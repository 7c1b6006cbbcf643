"""Two `lmforge sweep` processes on one PostgreSQL study at once: the trials are shared, none duplicated.

PostgreSQL is Debian's `postgresql` package (`make postgres` installs it): the test initdb's a cluster in
a temporary folder, starts the server on a free loopback port as the `postgres` user (the server refuses
to run as root) and stops it at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from test_sweep import env, sweep_yaml, tokens  # noqa: F401  (tokens is a fixture)

PY = sys.executable
BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


def _as_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not BINS:
        pytest.skip("PostgreSQL server binaries not installed (make postgres, or apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    if shutil.which("runuser") is None and os.geteuid() == 0:
        pytest.skip("running as root without runuser")
    bin_dir = BINS[-1].parent
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(
        _as_user([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lmforge"]),
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        _as_user(
            [str(bin_dir / "postgres"), "-D", str(data), "-k", str(root), "-h", "127.0.0.1", "-p", str(port)]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
            )
            if ready.returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "lmforge", "sweeps"],
            check=True,
        )
        yield f"postgresql://lmforge@127.0.0.1:{port}/sweeps"
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_sweeps_share_one_postgres_study_without_duplicates(
    postgres_url: str,
    tokens: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    procs = []
    for name, seed in (("a", 0), ("b", 1)):  # one seed per process, so their random draws differ
        folder = tmp_path / name
        folder.mkdir()
        path = sweep_yaml(folder, tokens, storage=postgres_url, study_name="shared", seed=seed)
        procs.append(
            subprocess.Popen(
                [PY, "-m", "lmforge", "sweep", "-c", str(path)],
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outs = [p.communicate(timeout=1500)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    url = "postgresql+psycopg://" + postgres_url.split("://", 1)[1]
    trials = [
        t
        for t in optuna.load_study(study_name="shared", storage=url).get_trials()
        if "surplus" not in t.user_attrs
    ]
    assert [t.number for t in trials] == list(range(6))  # 6 in all, not 6 each
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    owners = {t.user_attrs["owner"] for t in trials}
    assert len(owners) == 2  # both processes ran trials: shared
    assert len({t.params["optim.lr"] for t in trials}) == 6  # no params run twice
    # Each trial ran in exactly one process's folder.
    for t in trials:
        dirs = [tmp_path / n / "sweep" / "trials" / f"{t.number:04d}" for n in ("a", "b")]
        found = [d for d in dirs if d.exists() or d.with_name(d.name + ".partial").exists()]
        assert len(found) == 1, (t.number, found)
    # Both sweeps report the same study: their results tables list the same 6 trials.
    tables = [(tmp_path / n / "sweep" / "results.csv").read_text().splitlines()[1:] for n in ("a", "b")]
    assert [r.split(",")[0] for r in tables[0]] == [str(n) for n in range(6)]
