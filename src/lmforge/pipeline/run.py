"""`lmforge run pipeline.yaml`: run a pipeline's stages in order, each only when it has to.

    lmforge run configs/demo/pipeline.yaml              # what changed, and everything after it
    lmforge run configs/demo/pipeline.yaml --dry-run    # say what would run and why; run nothing
    lmforge run configs/demo/pipeline.yaml --from pretrain pretrain.max_steps=300

A stage runs when it never ran, failed last time, its resolved config changed (keys that only say how it
runs, like overwrite, aside), one of its inputs changed (the manifest of a folder its config names, or a
file's bytes), its output is missing or changed, or a stage before it ran in this invocation. Each stage runs as
`lmforge <command> -c <resolved config>` would, in the pipeline's workdir and in this process (no second
start-up and torch import per stage; `nproc` > 1 still launches torchrun); the state file records each
finished stage. A failed stage stops the pipeline with its exit code; the next run starts
again from it (a training stage continues from its newest checkpoint when its config is unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lmforge import cli
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text, partial_dir
from lmforge.model.integrity import latest_checkpoint
from lmforge.pipeline.spec import STAGE_COMMANDS, Pipeline, PipelineSpec, Stage, load_pipeline
from lmforge.pipeline.state import config_sha256, digest, input_digests, load_state, save_state, why_run

COMMAND = "run"
CONFIG = PipelineSpec  # the pipeline file's schema (each stage's config is its command's)
DESCRIPTION = (
    "Run the stages of a pipeline file in order. A stage runs when it never ran, failed last time, its "
    "config or one of its inputs changed, its output is missing or changed, or a stage before it ran; a "
    "failed stage stops the pipeline with its exit code, and the next run continues from it."
)
EXAMPLE = "lmforge run configs/demo/pipeline.yaml --dry-run"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lmforge run",
        description=DESCRIPTION,
        epilog=f"example:\n  {EXAMPLE}\n\nstage kinds: {', '.join(STAGE_COMMANDS)} (or any command name); "
        "see docs/pipeline.md for the file format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pipeline", type=Path, help="pipeline YAML file")
    p.add_argument("overrides", nargs="*", metavar="STAGE.key=value", help="override a stage's config key")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and every one after it")
    p.add_argument("--force", action="store_true", help="run every stage, changed or not")
    p.add_argument("--dry-run", action="store_true", help="print what would run and why, run nothing")
    return p.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    pipe = load_pipeline(args.pipeline, args.overrides)
    names = [s.name for s in pipe.stages]
    start = None
    if args.force:
        start = 0
    elif args.start is not None:
        if args.start not in names:
            raise ConfigError(
                f"--from: no stage {args.start!r} in {args.pipeline}; stages: {', '.join(names)}"
            )
        start = names.index(args.start)
    with _cwd(pipe.workdir):
        return run(pipe, start=start, dry_run=args.dry_run, forced="--force" if args.force else args.start)


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    """Stages resolve their relative paths against the pipeline's workdir, and so does the fingerprinting."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run(pipe: Pipeline, *, start: int | None = None, dry_run: bool = False, forced: str | None = None) -> int:
    """Run the stages that must run; returns 0 or the exit code of the stage that failed."""
    state = load_state(pipe.state)
    n, ran, counts = len(pipe.stages), None, {"ran": 0, "skipped": 0}
    for i, stage in enumerate(pipe.stages):
        if start is not None and i < start:
            reason = None
        elif start is not None:
            reason = f"{'--force' if forced == '--force' else f'--from {forced}'} asks for it"
        elif ran is not None:
            reason = f"it comes after {ran}, which {'would run' if dry_run else 'ran'}"
        else:
            reason = why_run(stage, state.get(stage.name), pipe.workdir)
        tag = f"[{i + 1}/{n}] {stage.name}"
        if reason is None:
            print(f"{tag}: up to date, skipped", file=sys.stderr)
            counts["skipped"] += 1
            continue
        ran = stage.name
        counts["ran"] += 1
        if dry_run:
            print(f"{tag}: would run `lmforge {stage.command}`: {reason}", file=sys.stderr)
            continue
        print(f"{tag}: running `lmforge {stage.command}`: {reason}", file=sys.stderr, flush=True)
        code = _execute(pipe, stage, state)
        if code != 0:
            print(
                f"error: stage {stage.name} failed (exit {code}); fix it and run `lmforge run {pipe.path}` "
                "again to continue from it",
                file=sys.stderr,
            )
            return code
    verb = "would run" if dry_run else "ran"
    where = os.path.relpath(pipe.state, pipe.workdir)
    print(
        f"pipeline: {counts['ran']} stages {verb}, {counts['skipped']} up to date ({where})", file=sys.stderr
    )
    return 0


def _execute(pipe: Pipeline, stage: Stage, state: dict[str, dict[str, Any]]) -> int:
    """Run one stage in its own process and record the outcome in the state file."""
    record = state.get(stage.name)
    tree = dict(stage.tree)
    if _can_continue(stage, record):
        tree["resume"] = "auto"
        print(f"  continuing {stage.output} from its newest checkpoint", file=sys.stderr)
    folder = pipe.state.parent / f"{pipe.state.name.removesuffix('.json')}.stages"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{stage.name}.yaml"
    atomic_write_text(file, yaml.safe_dump({"command": stage.command, **tree}, sort_keys=False))
    inputs = input_digests(stage, pipe.workdir)
    t0 = time.perf_counter()
    code = _call([*stage.command.split(), "-c", str(file)])
    seconds = round(time.perf_counter() - t0, 3)
    if stage.output is None:  # serve: nothing to record
        return code
    entry: dict[str, Any] = {"config_sha256": config_sha256(stage), "inputs": inputs, "output": stage.output}
    if code == 0:
        entry.update(status="done", output_digest=digest(pipe.workdir / stage.output), seconds=seconds)
        print(f"  {stage.name} done in {seconds:.1f} s", file=sys.stderr)
    else:
        entry.update(status="failed", exit_code=code, seconds=seconds)
    state[stage.name] = entry
    save_state(pipe.state, state)
    return code


def _call(argv: list[str]) -> int:
    """`lmforge ARGV` in this process: its exit code; torch's thread count is restored after it."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse errors
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


def _can_continue(stage: Stage, record: dict[str, Any] | None) -> bool:
    """A training stage that failed with this same config, and left checkpoints: resume it, as `make demo` did."""
    if (
        record is None
        or record.get("status") != "failed"
        or "checkpoint" not in type(stage.config).model_fields
    ):
        return False
    if record.get("config_sha256") != config_sha256(stage) or stage.output is None:
        return False
    return latest_checkpoint(partial_dir(Path(stage.output)) / "checkpoints") is not None
