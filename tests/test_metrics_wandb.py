"""W&B logging, checked by reading back the run file that wandb writes in offline mode (no network)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

SCRIPT = """
from pathlib import Path
from lmforge.train.metrics import MetricsLogger
m = MetricsLogger(Path('.'), enabled=True, tensorboard=False, wandb_project='lmforge-test', config={'lr': 0.1})
for s in (1, 2, 3):
    m.log('train', s, {'loss': 5.0 - s, 'lr': 0.1, 'skipped': False, 'samples': ['text']})
m.log('eval', 3, {'val_bpb': 2.5})
m.close()
"""


def read_history(run_file: Path) -> list[dict[str, str]]:
    """History records of a .wandb file: a LevelDB-style log (32 KiB blocks of crc/len/type records)
    of protobuf `Record`s after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item})
    return rows


def test_wandb_receives_train_and_eval_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, check=True, timeout=120)
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = read_history(run_file)
    assert [int(r["_step"]) for r in rows] == [1, 2, 3]
    assert [float(r["train/loss"]) for r in rows] == [4.0, 3.0, 2.0]
    assert float(rows[-1]["eval/val_bpb"]) == 2.5
    assert all("train/skipped" not in r and "train/samples" not in r for r in rows)  # numbers only
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4
