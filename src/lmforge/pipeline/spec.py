"""A pipeline file: the stages `lmforge run` chains, each a command with its config, resolved and validated.

    command: run
    workdir: ../..                    # where the stages run: their relative paths resolve here
    stages:
      - stage: prepare                # a stage kind (STAGE_COMMANDS) or any command, e.g. "lora merge"
        config: prepare.yaml          # a config file (relative to this file's folder) or an inline mapping
        overrides: {output: runs/demo/curated}
      - stage: tokenizer
        name: tokenizer               # unique name (default: the stage kind); `--from NAME` uses it
        ...

Paths: every path field of a stage's config (lmforge.config: `ConfigPath`, `ConfigRef`) resolves against the
folder of the file it is written in: the stage's config file, or this pipeline file for `config:` files,
inline configs and `overrides:`; `NAME.key=value` on the command line against the current directory. The
stages run in `workdir` (default: the pipeline file's folder), where any other relative value resolves.
A stage's config is validated here, before anything runs.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lmforge.cli import COMMANDS
from lmforge.config import (
    ConfigPath,
    Section,
    parse_override,
    read_config_file,
    resolve_dotted,
    resolve_paths,
    set_dotted,
    validate_tree,
)
from lmforge.errors import ConfigError

STAGE_COMMANDS = {
    "prepare": "prepare",
    "tokenizer": "tokenizer train",
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "align": "align dpo",
    "eval": "eval",
    "quantize": "quantize",
    "export": "export",
    "serve": "serve",
}
# Keys that say how a stage runs, not what it makes: they do not enter its config hash.
RUN_CONTROL = ("overwrite", "resume", "progress")


class StageSpec(Section):
    stage: str = Field(..., description=f"stage kind ({', '.join(STAGE_COMMANDS)}) or any lmforge command")
    name: str | None = Field(None, description="unique name of the stage (default: its kind)")
    config: str | dict[str, Any] = Field(
        default_factory=dict, description="config file (relative to the pipeline file) or an inline mapping"
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys set on top of config")


class PipelineSpec(Section):
    workdir: ConfigPath | None = Field(
        None, description="folder the stages run in (relative to the pipeline file; default: its folder)"
    )
    state: ConfigPath | None = Field(
        None,
        description="state file (relative to this file; default: <first output's folder>/<name>.state.json)",
    )
    stages: list[StageSpec] = Field(..., min_length=1, description="the stages, in order")


@dataclass
class Stage:
    name: str
    command: str
    tree: dict[str, Any]  # the merged config the command reads (without `command:`)
    config: BaseModel  # the same, validated by the command's schema

    @property
    def output(self) -> str | None:
        """The stage's output directory (None for serve, which writes nothing)."""
        out = getattr(self.config, "output", None)
        return None if out is None else str(out)

    def config_dict(self) -> dict[str, Any]:
        """The validated config without run-control keys: what decides whether the stage reruns."""
        data = self.config.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in RUN_CONTROL}


@dataclass
class Pipeline:
    path: Path  # the pipeline file, absolute
    workdir: Path  # absolute
    state: Path  # absolute
    stages: list[Stage]


def schema_of(command: str, where: str) -> type[Section]:
    """The config schema of `lmforge <command>` (its module's CONFIG), looked up through the command table."""
    if command == "run":
        raise ConfigError(f"{where}: a pipeline cannot run another pipeline")
    if command not in COMMANDS:
        kinds = ", ".join(STAGE_COMMANDS)
        raise ConfigError(
            f"{where}: unknown stage {command!r}; expected one of {kinds} or an lmforge command"
        )
    module = importlib.import_module(COMMANDS[command][0].split(":")[0])
    schema = getattr(module, "CONFIG", None)
    if not (isinstance(schema, type) and issubclass(schema, Section)):
        raise ConfigError(f"{where}: `lmforge {command}` takes no config file, so it cannot be a stage")
    return schema


def _stage_tree(
    spec: StageSpec, schema: type[Section], folder: Path, where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged config mapping, {dotted key: source named in errors}) of one stage, before validation."""
    if isinstance(spec.config, str):
        file = folder / spec.config
        tree, source = read_config_file(file, schema), f"{where} ({file})"
    else:
        tree, source = resolve_paths(schema, dict(spec.config), folder), f"{where}: config"
    sources = {"": source}
    for key, value in resolve_dotted(schema, spec.overrides, folder).items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"{where}: overrides: empty key in {key!r}")
        set_dotted(tree, parts, value, f"{where}: overrides.{key}")
        sources[str(key)] = f"{where}: overrides.{key}"
    return tree, sources


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    """Read, resolve and validate every stage of pipeline file `path`; `overrides`: `NAME.key=value`."""
    path = Path(os.path.abspath(path))  # not resolve(): paths follow the folder as the user sees it
    raw = read_config_file(path, PipelineSpec)
    meant_for = raw.pop("command", "run")
    if meant_for != "run":
        raise ConfigError(
            f"{path}: this config is for `lmforge {meant_for}`, not a pipeline for `lmforge run`"
        )
    spec = validate_tree(PipelineSpec, raw, str(path))
    folder = path.parent
    workdir = Path(os.path.normpath(folder / spec.workdir)) if spec.workdir else folder
    stages: list[Stage] = []
    by_name: dict[str, dict[str, Any]] = {}
    commands: dict[str, str] = {}
    trees: list[tuple[str, type[Section], dict[str, Any], dict[str, str]]] = []
    for n, st in enumerate(spec.stages):
        name = st.name or st.stage
        where = f"{path}: stages.{n} ({name})"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{where}: name: expected letters, digits, '_', '-' or '.', got {name!r}")
        if name in by_name:
            raise ConfigError(f"{where}: stage name {name!r} is used twice; give one a `name:`")
        command = STAGE_COMMANDS.get(st.stage, st.stage)
        schema = schema_of(command, where)
        tree, sources = _stage_tree(st, schema, folder, where)
        meant = tree.pop("command", None)
        if meant is not None and meant != command:
            raise ConfigError(f"{sources['']}: this config is for `lmforge {meant}`, not `lmforge {command}`")
        by_name[name] = tree
        trees.append((name, schema, tree, sources))
        commands[name] = command
    for item in overrides or []:
        parts, value = parse_override(item)
        if len(parts) < 2 or parts[0] not in by_name:
            raise ConfigError(
                f"override {item!r}: expected STAGE.key=value, STAGE one of {', '.join(by_name)}"
            )
        schema = next(t[1] for t in trees if t[0] == parts[0])
        key = ".".join(parts[1:])
        value = resolve_dotted(schema, {key: value}, Path.cwd())[key]  # the stages run in workdir
        set_dotted(by_name[parts[0]], parts[1:], value, f"override {item!r}")
        next(t[3] for t in trees if t[0] == parts[0])[key] = f"override {item!r}"
    for name, schema, tree, sources in trees:
        command = commands[name]
        if "overwrite" in schema.model_fields and "overwrite" not in tree:
            tree["overwrite"] = True  # a stage that reruns replaces what it made before
        stages.append(Stage(name, command, tree, validate_tree(schema, tree, sources)))
    return Pipeline(path, workdir, _state_path(spec, path, workdir, stages), stages)


def _state_path(spec: PipelineSpec, path: Path, workdir: Path, stages: list[Stage]) -> Path:
    if spec.state:
        return workdir / spec.state
    first = next((s.output for s in stages if s.output), None)
    base = (workdir / first).parent if first else workdir
    return base / f"{path.stem}.state.json"
