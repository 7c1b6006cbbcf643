"""`accelerate launch -m lmforge pretrain`: the launcher's environment read like torchrun's, and two
accelerate-launched CPU processes training the same losses as torchrun (`nproc=2`) and as one process."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.train import distributed as D
from lmforge.train.common import parse_single_process
from lmforge.train.finetune import CONFIG as FINETUNE_CONFIG
from lmforge.train.metrics import read_metrics
from train_helpers import make_tokens_dir, shakespeare_text

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
BASE = ["model=tiny", "seq_len=64", "global_batch=16", "micro_batch=4", "optim.lr=3e-3", "schedule.warmup_steps=3",
        "eval.every=0", "eval.sample_tokens=0", "log_every=1", "progress=false", "tensorboard=false",
        "max_steps=4", "checkpoint.every=0"]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, D.DistInfo(0, 1, 0)),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, D.DistInfo(1, 2, 1)),  # torchrun, accelerate
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
         D.DistInfo(3, 4, 1)),  # accelerate's multi-CPU mode under Open MPI
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, D.DistInfo(2, 4, 0)),  # Intel MPI
    ],
)  # fmt: skip
def test_every_launchers_environment_gives_the_same_ranks(env: dict[str, str], expected: D.DistInfo) -> None:
    assert D.from_env(env) == expected
    assert D.launched(env) == expected.enabled


def test_a_bad_rank_variable_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE: expected an integer, got 'two'$"):
        D.from_env({"WORLD_SIZE": "two"})


def test_accelerate_precision_names() -> None:
    assert [D.accelerate_precision({"ACCELERATE_MIXED_PRECISION": v}) for v in ("no", "fp16", "bf16", "fp8")] == [
        "fp32", "fp16", "bf16", None]  # fmt: skip
    assert D.accelerate_precision({}) is None


def test_a_single_process_trainer_refuses_a_launched_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^finetune runs in one process; it was launched as 2 "):
        parse_single_process(["output=x", "data=x", "model=x"], FINETUNE_CONFIG, "finetune", "d", "e")


def documented_configs() -> dict[str, str]:
    """The accelerate config files of docs/launch.md: {first comment line: YAML text}."""
    text = (ROOT / "docs" / "launch.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(# accelerate config: [^\n]*)\n(.*?)```", text, flags=re.S)
    return {title.removeprefix("# accelerate config: "): body for title, body in blocks}


def test_the_documented_accelerate_configs_load_in_accelerate(tmp_path: Path) -> None:
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    configs = documented_configs()
    assert len(configs) == 3, sorted(configs)
    for i, body in enumerate(configs.values()):
        path = tmp_path / f"{i}.yaml"
        path.write_text(body)
        loaded = config_args.load_config_from_file(str(path))
        assert loaded.num_processes == yaml.safe_load(body)["num_processes"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl", "train")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed (pip install 'lmforge[launch]')")
def test_accelerate_launch_matches_torchrun_and_one_process(tmp_path: Path) -> None:
    """2 processes x micro 4 x accumulation 2 = 1 x 4 x 4: the same global batch, the same losses (only the
    order of float additions differs: the torchrun parity tests' 1e-5)."""
    assert ACCELERATE is not None
    tokens = make_tokens_dir(tmp_path / "tokens", shakespeare_text(300_000))
    data = [*BASE, f"data={tokens}"]
    assert main(["pretrain", *data, f"output={tmp_path / 'one'}"]) == 0
    run([sys.executable, "-m", "lmforge", "pretrain", *data, f"output={tmp_path / 'torchrun'}", "nproc=2"])
    launch = [
        ACCELERATE,
        "launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    acc = tmp_path / "accelerate.yaml"
    acc.write_text(documented_configs()["one machine, 2 processes"])  # as docs/launch.md runs it
    two = run([ACCELERATE, "launch", "--config_file", str(acc), "--main_process_port", str(free_port()),
               "-m", "lmforge", "pretrain", *data, "device=cpu", f"output={tmp_path / 'accelerate'}"])  # fmt: skip
    assert "launching: torchrun" not in two.stderr  # already a rank: lmforge did not launch again
    # --cpu starts one process (accelerate's multi-CPU mode is mpirun); lmforge says so and trains alone
    cpu = run([*launch, "--cpu", "--num_processes", "2", "--main_process_port", str(free_port()),
               "-m", "lmforge", "pretrain", *data, f"output={tmp_path / 'accelerate-cpu'}"])  # fmt: skip
    assert "note: `accelerate launch --cpu` started one process" in cpu.stderr
    one = losses(tmp_path / "one")
    assert sorted(one) == [1, 2, 3, 4]
    for name in ("torchrun", "accelerate", "accelerate-cpu"):
        other = losses(tmp_path / name)
        assert sorted(other) == [1, 2, 3, 4] and all(abs(one[s] - other[s]) < 1e-5 for s in one), (
            name,
            other,
            one,
        )
    assert losses(tmp_path / "accelerate") == losses(
        tmp_path / "torchrun"
    )  # same ranks, same reduction order
