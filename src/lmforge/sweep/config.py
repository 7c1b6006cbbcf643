"""The `lmforge sweep` config (search space, objective, pruner, storage) and the trial configs built from it.

A trial's config is the training command's own YAML file with the fixed overrides and the trial's sampled
values merged in (dotted keys, e.g. `optim.lr`), so it runs as is: `lmforge pretrain -c trial.yaml`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from lmforge.config import ConfigPath, Section, read_config_file, resolve_dotted
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text
from lmforge.train.align_configs import GRPOConfig, RewardConfig
from lmforge.train.configs import DPOConfig, FinetuneConfig, PretrainConfig

# The config schema of each training command a sweep can run: its path keys resolve as in that command.
SCHEMAS: dict[str, type[Section]] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "align dpo": DPOConfig,
    "align reward": RewardConfig,
    "align grpo": GRPOConfig,
}
TRAIN_COMMANDS = tuple(SCHEMAS)


class ParamSpec(Section):
    type: Literal["float", "int", "categorical"] = Field(..., description="float | int | categorical")
    low: float | None = Field(None, description="float/int: smallest value")
    high: float | None = Field(None, description="float/int: largest value (included)")
    log: bool = Field(False, description="float/int: sample on a log scale (learning rates)")
    step: float | None = Field(None, description="float/int: grid spacing (null = continuous / 1)")
    choices: list[Any] | None = Field(None, description="categorical: the values to choose from")

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log=true and step cannot be combined")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs whole `low` and `high`")
        return self


class TrainTarget(Section):
    command: Literal["pretrain", "finetune", "align dpo", "align reward", "align grpo"] = Field(
        ...,
        description="the training command each trial runs: "
        "pretrain | finetune | align dpo | align reward | align grpo",
    )
    config: ConfigPath = Field(..., description="that command's YAML config (the base of every trial)")
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides for every trial, dotted keys, e.g. {max_steps: 60, eval.every: 10}",
    )

    @classmethod
    def resolve_file_paths(cls, tree: dict[str, Any], folder: Path) -> dict[str, Any]:
        """`fixed` written in the sweep file: its path keys (data, base, ...) resolve against that file's
        folder, as the training command would resolve them in its own config file."""
        schema = SCHEMAS.get(str(tree.get("command")))
        fixed = tree.get("fixed")
        if schema is None or not isinstance(fixed, dict):
            return tree
        return {**tree, "fixed": resolve_dotted(schema, fixed, folder)}


class ObjectiveConfig(Section):
    metric: str = Field("val_bpb", description="a key of the run's eval records in metrics.jsonl")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="minimize | maximize")


class PrunerConfig(Section):
    kind: Literal["median", "halving", "none"] = Field(
        "median", description="median | halving (successive halving) | none"
    )
    startup_trials: int = Field(2, ge=0, description="median: finished trials before any pruning")
    warmup_steps: int = Field(0, ge=0, description="median: never prune a trial before this step")
    min_steps: int = Field(1, ge=1, description="halving: steps every trial gets (min resource)")
    reduction_factor: int = Field(3, ge=2, description="halving: keep 1 in this many at each rung")


class SweepConfig(Section):
    output: ConfigPath = Field(
        ..., description="sweep directory: trials/, results, plots, best.yaml, study.db"
    )
    train: TrainTarget
    params: dict[str, ParamSpec] = Field(
        ..., min_length=1, description="dotted config key -> range, e.g. optim.lr: {type: float, ...}"
    )
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="what to optimize")
    trials: int = Field(20, ge=1, description="trials in the study (all processes together)")
    timeout_s: float | None = Field(
        None, gt=0, description="start no new trial after this many seconds (null = no limit)"
    )
    trials_in_parallel: int | Literal["auto"] = Field(
        1, description="trials run at once by this process; auto = one per GPU (1 without GPUs)"
    )
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="early stopping of bad trials")
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe (Bayesian) | random")
    sampler_startup_trials: int = Field(
        10, ge=0, description="tpe: trials sampled at random before TPE models the results (Optuna's 10)"
    )
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="trials to run first with these params, e.g. [{optim.lr: 3.0e-3}] (the base config's own "
        "values, to measure the sweep against); params left out are sampled",
    )
    seed: int = Field(0, description="seeds the sampler")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (null = sqlite:///<output>/study.db); postgresql://user@host/db lets "
        "several machines share one study",
    )
    study_name: str | None = Field(None, description="study in the storage (null = the output's name)")
    backend: Literal["optuna", "ray"] = Field(
        "optuna", description="optuna (trials run by this process) | ray (trials as Ray Tune tasks)"
    )
    ray_address: str | None = Field(
        None, description="ray: the cluster to join, e.g. ray://head:10001 or auto (null = start a local Ray)"
    )
    ray_resources: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 1.0}, description="ray: resources per trial, e.g. {cpu: 4, gpu: 1}"
    )
    poll_s: float = Field(0.5, gt=0, description="how often a running trial's metrics.jsonl is read")
    heartbeat_s: float = Field(10.0, gt=0, description="how often a sweep says its trials are alive")
    grace_s: float = Field(
        120.0, gt=0, description="a trial of another machine whose heartbeat is this old is taken over"
    )

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if isinstance(self.trials_in_parallel, int) and self.trials_in_parallel < 1:
            raise ValueError("trials_in_parallel must be >= 1 or auto")
        taken = {"output", "resume", "overwrite"} & (set(self.params) | set(self.train.fixed))
        if taken:
            raise ValueError(f"{sorted(taken)} are set by the sweep for each trial")
        for n, trial in enumerate(self.enqueue):
            unknown = sorted(set(trial) - set(self.params))
            if unknown:
                raise ValueError(f"enqueue.{n}: {unknown} are not in params ({', '.join(self.params)})")
        return self

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.output).resolve() / 'study.db'}"

    def name(self) -> str:
        return self.study_name or Path(self.output).resolve().name


def read_base(path: str, command: str) -> dict[str, Any]:
    """The training command's YAML config as a tree, its relative paths resolved against its folder (the
    trial configs are written elsewhere); validated later by the command itself."""
    try:
        return read_config_file(Path(path), SCHEMAS[command])
    except ConfigError as e:
        raise ConfigError(f"train.config: {e}") from None


def merge(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in `tree`; a mapping merges into a mapping, as dotted overrides would."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    old = node.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict):
        for k, v in value.items():
            merge(old, str(k), v)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def trial_config(
    cfg: SweepConfig, base: dict[str, Any], params: dict[str, Any], output: Path
) -> dict[str, Any]:
    """The full config of one trial: base <- fixed <- params, writing to `output`."""
    tree = copy.deepcopy(base)
    tree["command"] = cfg.train.command
    for key, value in {**cfg.train.fixed, **params}.items():
        merge(tree, key, value)
    tree["output"] = str(Path(output).resolve())  # absolute: the trial's config file lives elsewhere
    tree.pop("resume", None)
    return tree


def lookup(tree: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def first_values(cfg: SweepConfig) -> dict[str, Any]:
    """Each parameter at its low end (first choice): a sample to check the trial config with."""
    out: dict[str, Any] = {}
    for key, spec in cfg.params.items():
        if spec.type == "categorical":
            assert spec.choices
            out[key] = spec.choices[0]
        else:
            out[key] = int(spec.low) if spec.type == "int" else spec.low  # type: ignore[arg-type]
    return out


def write_yaml(path: Path, tree: dict[str, Any], header: str = "") -> None:
    body = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    atomic_write_text(path, header + body)
