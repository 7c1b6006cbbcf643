"""Typed configs for every command: YAML file + dotted overrides, strict validation, readable errors.

    lmforge prepare -c configs/demo/prepare.yaml dedup.threshold=0.85 workers=2

Each command declares a pydantic schema built from `Section`s (unknown keys are rejected). A field's
`description` doubles as its `--help` text. `load_config` merges the YAML file and the overrides, and turns
pydantic's errors into one line each that names the file (or override), the dotted key and what was
expected, with the closest valid key for a typo. Every stage writes its resolved config with `save_config`.

Relative paths: a field declared `ConfigPath` (or `ConfigFsPath`, a `pathlib.Path`) holds a filesystem path;
a relative one written in a config FILE resolves against that file's folder, so `data: ../../runs/demo/tokens`
in configs/demo/pretrain.yaml works from any directory. A `ConfigRef` field holds a path or a name (a preset
such as `tiny`, a hub id `ORG/NAME`, `auto`): it resolves only when it starts with ./ or ../ or names
something that exists next to the file. URLs, `scheme:` values (`hf:`, `demo:`), absolute and `~` paths are
never changed. Overrides on the command line (`data=runs/x`) stay relative to the current directory.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge import crypt
from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text

T = TypeVar("T", bound="Section")

CONFIG_FILE = "config.yaml"


class FileRelative:
    """The mark of a path field (`ConfigPath`, `ConfigFsPath`, `ConfigRef`): see the module doc."""

    def __init__(self, only_if_found: bool) -> None:
        self.only_if_found = only_if_found  # ConfigRef: a name unless it looks like, or is, a path here

    def resolve(self, value: Any, folder: Path) -> Any:
        if isinstance(value, list):
            return [self.resolve(v, folder) for v in value]
        if not isinstance(value, str | Path):
            return value
        text = str(value)
        if not text or os.path.isabs(text) or text.startswith("~") or _SCHEME.match(text):
            return value
        target = folder / text
        if self.only_if_found and not text.startswith(("./", "../")) and not target.exists():
            return value
        return type(value)(os.path.normpath(target))


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # hf:ORG/NAME, demo:shakespeare, https://, sqlite:///
ConfigPath = Annotated[str, FileRelative(only_if_found=False)]
ConfigFsPath = Annotated[Path, FileRelative(only_if_found=False)]
ConfigRef = Annotated[str, FileRelative(only_if_found=True)]


class Section(BaseModel):
    """Base for every config block: unknown keys are errors, assignments are validated, and a float
    field (nested, or inside a dict or list) refuses inf and NaN: `optim.lr=inf` would make every weight
    non-finite. Untyped (`Any`) values are checked by `load_config` (see `_non_finite`)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )


class EncryptionConfig(Section):
    """Encryption at rest (docs/encryption.md), a section of every command that reads or writes models or data."""

    key_file: ConfigFsPath | None = Field(
        None,
        description=f"file holding the 256-bit key (hex or base64; `lmforge crypt keygen FILE`); "
        f"default: ${crypt.KEY_ENV}",
    )
    enabled: bool | None = Field(
        None,
        description="encrypt this command's outputs (null = whenever a key is set); loaders always decrypt",
    )


def encryption_field() -> Any:
    return Field(default_factory=EncryptionConfig, description="encryption at rest")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `X | None` or `Optional[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _type_name(annotation: Any) -> str:
    """`Literal['a', 'b']` -> "a|b"; `list[str] | None` -> "list[str] | None"; `int` -> "int"."""
    if get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    if get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def field_table(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, description) for every leaf field, in declaration order."""
    rows: list[tuple[str, str, Any, str]] = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        sub = _submodel(field.annotation)
        if sub is not None:
            rows.extend(field_table(sub, key + "."))
            continue
        tstr = _type_name(typing.get_type_hints(schema).get(name, field.annotation))
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        rows.append((key, tstr, default, field.description or ""))
    return rows


def valid_keys(schema: type[BaseModel]) -> list[str]:
    keys: list[str] = []
    for name, field in schema.model_fields.items():
        keys.append(name)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(f"{name}.{k}" for k in valid_keys(sub))
    return keys


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML so 0.8, true, [1, 2] work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. dedup.threshold=0.85")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _text_field(schema: type[BaseModel], parts: list[str]) -> bool | None:
    """Whether `a.b` is a plain text field (`str`: True, `str | None`: None); False for anything else.

    Text fields take an override's value verbatim, so `prompt=#include <x>`, `prompt=1984` and
    `system=Rules: be terse` stay strings instead of becoming a YAML comment, a number or a mapping."""
    model: type[BaseModel] | None = schema
    for part in parts[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        model = _submodel(field.annotation) if field is not None else None
    field = model.model_fields.get(parts[-1]) if model is not None else None
    if field is None:
        return False
    if field.annotation is str:
        return True
    plain = {get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(field.annotation)}
    return None if plain == {str, type(None)} else False


def set_dotted(tree: dict[str, Any], parts: list[str], value: Any, source: str) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts)}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping ({} when empty); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _mark(annotation: Any) -> FileRelative | None:
    """The FileRelative mark inside `ConfigPath`, `ConfigPath | None`, `list[ConfigPath]`, ..., if any."""
    if get_origin(annotation) is Annotated:
        found = [m for m in annotation.__metadata__ if isinstance(m, FileRelative)]
        return found[0] if found else _mark(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType, list):
        return next((m for m in map(_mark, get_args(annotation)) if m is not None), None)
    return None


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The sections a field holds: `X`, `X | None`, `list[X]`, a (discriminated) union of sections."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:
        return _models(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType, list):
        return [m for a in get_args(annotation) for m in _models(a)]
    return []


def _in_section(models: list[type[BaseModel]], value: Any, folder: Path) -> Any:
    """`value` (a section's mapping, or a list of them) resolved with the section whose keys it uses."""
    if isinstance(value, list):
        return [_in_section(models, v, folder) for v in value]
    if not isinstance(value, dict):
        return value
    model = next((m for m in models if set(map(str, value)) <= set(m.model_fields)), models[0])
    return resolve_paths(model, value, folder)


def resolve_paths(schema: type[BaseModel], tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`tree` (a config file's mapping) with the relative values of its path fields resolved against
    `folder`, the file's folder (absolute). Keys the schema lacks are left for validation to report; a
    schema whose `Any` fields hold paths (the sweep's overrides) adds a `resolve_file_paths` classmethod."""
    out = dict(tree)
    for key, value in tree.items():
        field = schema.model_fields.get(str(key))
        if field is None:
            continue
        mark = next((m for m in field.metadata if isinstance(m, FileRelative)), None) or _mark(
            field.annotation
        )
        models = _models(field.annotation)
        if mark is not None:
            out[key] = mark.resolve(value, folder)
        elif models:
            out[key] = _in_section(models, value, folder)
    hook = getattr(schema, "resolve_file_paths", None)
    return hook(out, folder) if hook is not None else out


def resolve_dotted(schema: type[BaseModel], items: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`{dotted key: value}` overrides written in a file, with path values resolved against `folder`."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        *head, last = str(key).split(".")
        model: type[BaseModel] | None = schema
        for part in head:
            field = model.model_fields.get(part) if model is not None else None
            model = _submodel(field.annotation) if field is not None else None
        out[key] = value if model is None else resolve_paths(model, {last: value}, folder)[last]
    return out


def read_config_file(path: Path, schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """A config file's mapping, with the relative paths of `schema`'s path fields resolved against its folder."""
    tree = read_yaml(path)
    # abspath, not resolve(): a symlinked config folder is where the user sees it, as in a shell
    return tree if schema is None else resolve_paths(schema, tree, Path(os.path.abspath(path)).parent)


def _non_finite(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every inf/NaN float in a raw config tree (YAML `.inf`, `.nan`), `Any` fields included."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return [prefix]
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _non_finite(v, f"{prefix}{'.' if prefix else ''}{key}")]
    if isinstance(tree, list):
        return [k for n, v in enumerate(tree) for k in _non_finite(v, f"{prefix}.{n}")]
    return []


def _source(loc: str, source_of: dict[str, str]) -> str:
    """The file or override that set dotted key `loc`."""
    return source_of.get(loc) or next(
        (src for key, src in source_of.items() if loc.startswith(key + ".")), source_of.get("", "config")
    )


def _describe(error: Any, schema: type[BaseModel], source_of: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    source = _source(loc, source_of)
    if error["type"] == "extra_forbidden":
        match = difflib.get_close_matches(loc, valid_keys(schema), n=1, cutoff=0.6)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        return f"{source}: unknown key {loc!r}{hint}"
    if error["type"] == "missing":
        return f"{source}: missing required key {loc!r}"
    got = error.get("input")
    return f"{source}: {loc}: {error['msg'].lower()}, got {got!r}"


def load_config(
    schema: type[T],
    path: Path | str | None = None,
    overrides: list[str] | None = None,
    *,
    command: str | None = None,
) -> T:
    """Build a validated `schema` from an optional YAML file and `key.sub=value` overrides.

    A file may name the command it is for in a top-level `command:` key; loading it for another
    command is an error rather than a cascade of unknown keys.
    """
    tree: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        tree = read_config_file(path, schema)
        source_of[""] = str(path)
    meant_for = tree.pop("command", None)
    if command is not None and meant_for is not None and meant_for != command:
        raise ConfigError(f"{path}: this config is for `lmforge {meant_for}`, not `lmforge {command}`")
    for item in overrides or []:
        parts, value = parse_override(item)
        text = _text_field(schema, parts)
        raw = item.split("=", 1)[1]
        if text or (text is None and raw not in ("null", "~", "")):
            value = raw
        set_dotted(tree, parts, value, f"override {item!r}")
        source_of[".".join(parts)] = f"override {item!r}"
    return validate_tree(schema, tree, source_of)


def validate_tree(schema: type[T], tree: dict[str, Any], source_of: dict[str, str] | str) -> T:
    """`schema` from a merged config mapping; errors name `source_of` (one source, or one per dotted key)."""
    if isinstance(source_of, str):
        source_of = {"": source_of}
    bad = _non_finite(tree)  # YAML .inf/.nan anywhere, values of untyped (`Any`) fields included
    if bad:
        raise ConfigError(
            "\n".join(f"{_source(key, source_of)}: {key}: input should be a finite number" for key in bad)
        )
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err, schema, source_of) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def to_yaml(cfg: BaseModel, command: str | None = None) -> str:
    data = cfg.model_dump(mode="json")
    if command is not None:
        data = {"command": command, **data}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_config(cfg: BaseModel, directory: Path, command: str | None = None) -> Path:
    """Write the resolved config next to a stage's outputs, so every result says how it was made."""
    path = Path(directory) / CONFIG_FILE
    atomic_write_text(path, to_yaml(cfg, command))
    return path


def capped(key: str, value: int, limit: int, what: str = "the model's context", *, say: bool = True) -> int:
    """`value` capped at `limit`, with a one-line notice on stderr when it is.

    A window longer than the model can attend over has one sensible reading (use the whole context), so a
    command caps it and says so rather than stopping: `notice: seq_len=4096 exceeds ... (2048); using 2048`.
    """
    if value <= limit:
        return value
    if say:
        print(
            f"notice: {key}={value} exceeds {what} ({limit}); using {key}={limit}",
            file=sys.stderr,
            flush=True,
        )
    return limit


def _help_epilog(schema: type[BaseModel]) -> str:
    rows = field_table(schema)
    width = min(34, max((len(k) for k, *_ in rows), default=0) + 2)
    lines = ["config keys (set in the YAML file or as key=value overrides):"]
    for key, tname, default, desc in rows:
        shown = "" if default is None else f" [default: {default}]"
        lines.append(f"  {key:<{width}}{desc} ({tname}){shown}".rstrip())
    return "\n".join(lines)


def parse_command(
    argv: list[str], schema: type[T], command: str, description: str, example: str | None = None
) -> T:
    """The standard argument parser of a stage: `-c FILE`, `key=value ...`, `--print-config`."""
    epilog = _help_epilog(schema)
    if example:
        epilog = f"example:\n  {example}\n\n{epilog}"
    p = argparse.ArgumentParser(
        prog=f"lmforge {command}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", type=Path, help="YAML config file (keys below)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key, e.g. seed=1")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    cfg = load_config(schema, args.config, args.overrides, command=command)
    enc = getattr(cfg, "encryption", None)  # the process's key: set once, before the command reads anything
    crypt.configure(*((enc.key_file, enc.enabled) if isinstance(enc, EncryptionConfig) else ()))
    if args.print_config:
        print(to_yaml(cfg, command), end="")
        raise SystemExit(0)
    return cfg
