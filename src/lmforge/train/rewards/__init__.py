"""Reward functions for `align grpo`: a registry of kinds, each a config Section and a factory.

    rewards:
      - {kind: exact_match, field: answer}                  # 1 if the completion (stripped) == row[field]
      - {kind: numeric_match, field: answer, tol: 0}        # 1 if the last number in it is within tol
      - {kind: regex, pattern: "^\\d+$", weight: 0.2}       # 1 if the pattern matches (format check)
      - {kind: length, target: 64, weight: -0.01}           # characters beyond target (a penalty)
      - {kind: python, function: "mypkg.mod:fn", scale: 2}  # fn(prompts, completions, rows, scale=2)

The total reward of a completion is sum(weight * fn). A function sees the batch of prompts (the rendered
text the model continued), the completions (text) and the prompt rows (the JSONL record, so `answer` and
any other field are there) and returns one float per completion. A new kind is one line in `KINDS`:
`KINDS["name"] = (ConfigClass, factory)` with `factory(config) -> RewardFn`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import ConfigDict, Field, ValidationError

from lmforge.config import Section
from lmforge.errors import ConfigError, LmforgeError


class RewardFn(Protocol):
    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> list[float]: ...


class RewardError(LmforgeError):
    """A reward function failed or returned something other than one finite float per completion."""


class RewardConfig(Section):
    kind: str = Field(..., description="which reward function (see KINDS)")
    weight: float = Field(1.0, description="its weight in the total reward (negative = a penalty)")
    name: str | None = Field(None, description="metric name (reward/<name>); default: the kind")


class FieldReward(RewardConfig):
    field: str = Field("answer", description="the prompt row's key holding the reference answer")


class ExactMatchConfig(FieldReward):
    strip: bool = Field(True, description="compare without leading/trailing whitespace")
    case_sensitive: bool = Field(True, description="false = compare lower-cased")


class NumericMatchConfig(FieldReward):
    tol: float = Field(0.0, ge=0, description="largest accepted |last number - reference|")


class RegexConfig(RewardConfig):
    pattern: str = Field(..., description="Python regular expression")
    full: bool = Field(False, description="true = the whole completion must match; false = search")


class LengthConfig(RewardConfig):
    target: int = Field(..., ge=0, description="length in characters that is not penalised")
    mode: Literal["over", "abs"] = Field(
        "over", description="over = characters beyond target; abs = |length - target|"
    )


class PythonConfig(RewardConfig):
    """Any other key is passed to the function as a keyword argument."""

    model_config = ConfigDict(extra="allow")
    function: str = Field(..., description="'module:function', importable from the working directory")


def _reference(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise RewardError(f"reward: prompt row has no field {key!r} (keys: {sorted(row)})")
    return row[key]


def exact_match(cfg: ExactMatchConfig) -> RewardFn:
    def norm(s: str) -> str:
        s = s.strip() if cfg.strip else s
        return s if cfg.case_sensitive else s.lower()

    def fn(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return [
            float(norm(c) == norm(str(_reference(r, cfg.field))))
            for c, r in zip(completions, rows, strict=True)
        ]

    return fn


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(cfg: NumericMatchConfig) -> RewardFn:
    def score(completion: str, row: dict[str, Any]) -> float:
        got, ref = last_number(completion), _reference(row, cfg.field)
        try:
            want = float(str(ref).replace(",", ""))
        except ValueError:
            raise RewardError(
                f"reward numeric_match: field {cfg.field!r} is not a number: {ref!r:.40}"
            ) from None
        return float(got is not None and abs(got - want) <= cfg.tol)

    def fn(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return [score(c, r) for c, r in zip(completions, rows, strict=True)]

    return fn


def regex(cfg: RegexConfig) -> RewardFn:
    try:
        pattern = re.compile(cfg.pattern)
    except re.error as e:
        raise ConfigError(f"rewards: regex pattern {cfg.pattern!r} does not compile ({e})") from None
    match = pattern.fullmatch if cfg.full else pattern.search

    def fn(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return [float(match(c) is not None) for c in completions]

    return fn


def length(cfg: LengthConfig) -> RewardFn:
    def fn(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        d = [len(c) - cfg.target for c in completions]
        return [float(max(x, 0) if cfg.mode == "over" else abs(x)) for x in d]

    return fn


def python_function(cfg: PythonConfig) -> RewardFn:
    """`module:function` called as fn(prompts, completions, rows, **params) -> list[float]."""
    module_name, _, attr = cfg.function.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"rewards: function {cfg.function!r}: expected 'module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards: function {cfg.function!r} cannot be imported ({e})") from None
    if not callable(target):
        raise ConfigError(f"rewards: {cfg.function!r} is not callable")
    params = dict(cfg.model_extra or {})

    def fn(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        return list(target(prompts, completions, rows, **params))

    return fn


Factory = Callable[[Any], RewardFn]
KINDS: dict[str, tuple[type[RewardConfig], Factory]] = {
    "exact_match": (ExactMatchConfig, exact_match),
    "numeric_match": (NumericMatchConfig, numeric_match),
    "regex": (RegexConfig, regex),
    "length": (LengthConfig, length),
    "python": (PythonConfig, python_function),
}


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn
    what: str  # for error messages: the kind, or the user function's name


def parse_reward(spec: Any, i: int) -> RewardConfig:
    """One `rewards:` entry validated by its kind's Section; a ConfigError naming rewards[i].key otherwise."""
    where = f"rewards[{i}]"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {spec!r:.60}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: unknown reward kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return KINDS[kind][0].model_validate(spec)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise ConfigError(f"{where}.{key}: missing required key for kind {kind}") from None
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{where}.{key}: unknown key for kind {kind}") from None
        raise ConfigError(f"{where}.{key}: {err['msg'].lower()}, got {err.get('input')!r:.60}") from None


def build_rewards(specs: list[Any]) -> list[Reward]:
    """The configured reward functions, validated; names are unique (a repeated kind gets _2, _3, ...)."""
    if not specs:
        raise ConfigError("rewards: at least one reward function is needed (e.g. [{kind: exact_match}])")
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        cfg = parse_reward(spec, i)
        base = cfg.name or cfg.kind
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        what = cfg.function if isinstance(cfg, PythonConfig) else cfg.kind
        out.append(Reward(name, cfg.weight, KINDS[cfg.kind][1](cfg), what))
    return out


def score(
    rewards: list[Reward], prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
) -> tuple[list[float], dict[str, list[float]]]:
    """(total reward per completion, each function's raw scores by name)."""
    per: dict[str, list[float]] = {}
    for r in rewards:
        try:
            values = r.fn(prompts, completions, rows)
        except LmforgeError:
            raise
        except Exception as e:  # a user function's bug: name it, do not dump a traceback into training
            raise RewardError(f"reward {r.name} ({r.what}) raised {type(e).__name__}: {e}") from e
        values = _checked(r, values, len(completions))
        per[r.name] = values
    totals = [sum(r.weight * per[r.name][j] for r in rewards) for j in range(len(completions))]
    return totals, per


def _checked(r: Reward, values: Any, n: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {r.name} ({r.what}): expected a list of floats, got {values!r:.60}"
        ) from None
    if len(out) != n:
        raise RewardError(f"reward {r.name} ({r.what}): returned {len(out)} values for {n} completions")
    if not all(math.isfinite(v) for v in out):
        raise RewardError(f"reward {r.name} ({r.what}): returned a non-finite value")
    return out


__all__ = [
    "KINDS",
    "Reward",
    "RewardConfig",
    "RewardError",
    "RewardFn",
    "build_rewards",
    "last_number",
    "score",
]
