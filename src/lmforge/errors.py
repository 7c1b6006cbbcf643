"""User-facing errors: the CLI prints their message on one line (no traceback) and exits with `exit_code`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class LmforgeError(Exception):
    """A mistake the user can fix (bad config, bad input path, corrupt data). Internal invariants use assert."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A config file or override that does not match the command's schema."""


class DataError(LmforgeError):
    """Input data that cannot be used: missing, empty, unreadable or malformed."""


class IntegrityError(LmforgeError):
    """A manifest check failed: a file is missing, truncated or has changed since it was written."""

    exit_code = 3


# Under torchrun every rank hits the same user error. A rank writes it here (one JSON file per rank) when
# `lmforge ... --nproc N` launched it, so the launcher reports it once; else only rank 0 prints it.
ERROR_DIR_ENV = "LMFORGE_ERROR_DIR"


def report(e: LmforgeError) -> None:
    """Print a user error on one line, once per job: see ERROR_DIR_ENV."""
    # torchrun/accelerate, then the MPI launchers behind accelerate's multi-CPU mode (train/distributed.py)
    names = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
    rank = next((os.environ[n].strip() for n in names if os.environ.get(n, "").strip()), "0")
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        path = Path(folder) / f"rank-{int(rank):05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"message": str(e), "exit_code": e.exit_code}), encoding="utf-8")
        tmp.replace(path)
    elif rank == "0":
        print(f"error: {e}", file=sys.stderr)


def first_rank_error(folder: Path) -> tuple[str, int] | None:
    """(message, exit code) of the lowest rank that reported a user error, or None."""
    for path in sorted(folder.glob("rank-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return str(data["message"]), int(data["exit_code"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
