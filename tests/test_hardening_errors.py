"""User mistakes end in one line and their exit code, also under torchrun (hardening issue, defect 8):
every rank hits the same error, the launcher reports it once instead of once per rank under torchrun's
ChildFailedError dump (exit 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import DataError, first_rank_error, report


@pytest.mark.dist
def test_an_error_under_nproc_2_is_one_line_with_its_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokens"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "lmforge", "pretrain", f"data={missing}", f"output={tmp_path / 'out'}"),
            *("max_steps=2", "global_batch=4", "micro_batch=2", "--nproc", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 3, r.stderr  # a folder without a manifest is an integrity failure
    assert len(errors) == 1 and str(missing) in errors[0] and "no manifest" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and "exitcode" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_ranks_report_through_the_launcher_folder_and_the_lowest_rank_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LMFORGE_ERROR_DIR", str(tmp_path))
    for rank, message in ((1, "input check failed on rank 0 (see its message)"), (0, "data: not found")):
        monkeypatch.setenv("RANK", str(rank))
        report(DataError(message))
    assert capsys.readouterr().err == ""  # the launcher prints, not the ranks
    assert first_rank_error(tmp_path) == ("data: not found", 2)
    monkeypatch.delenv("LMFORGE_ERROR_DIR")
    report(DataError("rank 1 stays quiet under a user's own torchrun"))  # RANK is still 0
    monkeypatch.setenv("RANK", "1")
    report(DataError("not printed"))
    assert capsys.readouterr().err == "error: rank 1 stays quiet under a user's own torchrun\n"
