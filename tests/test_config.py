"""Config machinery: YAML + overrides, strict keys with suggestions, typed errors, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, main, resolve
from lmforge.config import Section, load_config, save_config
from lmforge.errors import ConfigError


class Dedup(Section):
    threshold: float = 0.8
    num_perm: int = 128


class Demo(Section):
    output: str = "out"
    workers: int = 1
    dedup: Dedup = Dedup()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_merge(tmp_path: Path) -> None:
    p = write(tmp_path, "workers: 2\ndedup:\n  threshold: 0.7\n")
    cfg = load_config(Demo, p, ["dedup.num_perm=64", "output=x"])
    assert (cfg.workers, cfg.dedup.threshold, cfg.dedup.num_perm, cfg.output) == (2, 0.7, 64, "x")


def test_unknown_key_names_file_and_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "dedup:\n  treshold: 0.7\n")
    with pytest.raises(ConfigError) as e:
        load_config(Demo, p)
    msg = str(e.value)
    assert str(p) in msg and "'dedup.treshold'" in msg and "did you mean 'dedup.threshold'" in msg


def test_unknown_override_is_attributed_to_the_override() -> None:
    with pytest.raises(
        ConfigError, match=r"override 'wokers=3': unknown key 'wokers'; did you mean 'workers'"
    ):
        load_config(Demo, None, ["wokers=3"])


def test_wrong_type_names_field_and_expectation(tmp_path: Path) -> None:
    p = write(tmp_path, "dedup:\n  threshold: high\n")
    with pytest.raises(ConfigError, match=r"dedup.threshold: input should be a valid number.*'high'"):
        load_config(Demo, p)


def test_config_for_another_command_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "command: tokenize\nworkers: 1\n")
    with pytest.raises(ConfigError, match="for `lmforge tokenize`, not `lmforge prepare`"):
        load_config(Demo, p, command="prepare")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Demo, write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Demo, None, ["workers"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(Demo, None, ["dedup.threshold=0.9"])
    path = save_config(cfg, tmp_path, "prepare")
    assert load_config(Demo, path, command="prepare") == cfg


def test_cli_unknown_command_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepar"]) == 2
    assert "did you mean `lmforge prepare`" in capsys.readouterr().err


def test_every_command_resolves() -> None:
    for name in COMMANDS:
        found, func, rest = resolve([*name.split(), "x=1"])
        assert found == name and callable(func) and rest == ["x=1"]


ROOT = Path(__file__).resolve().parents[1]


def documented_overrides(path: Path) -> list[str]:
    """The key=value overrides of the command a recipe opens with (`# lmforge <cmd> -c <file> k=v ...`)."""
    import shlex

    first = path.read_text().splitlines()[0]
    assert first.startswith("# lmforge "), f"{path} must open with the command that runs it"
    return [t for t in shlex.split(first[2:]) if "=" in t and not t.startswith("-")]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """Each YAML in configs/ names its command and validates, with the overrides its first line documents."""
    import importlib

    import yaml

    command = yaml.safe_load(path.read_text())["command"]
    module, _ = COMMANDS[command][0].split(":")
    schema = importlib.import_module(module).CONFIG
    load_config(schema, path, documented_overrides(path), command=command)


def test_text_fields_take_override_values_verbatim(tmp_path: Path) -> None:
    from lmforge.infer.generate import GenerateConfig

    def prompt(value: str) -> object:
        return load_config(GenerateConfig, None, ["model=m", f"prompt={value}"]).prompt

    assert prompt("#include <stdio.h>") == "#include <stdio.h>"  # not a YAML comment
    assert prompt("1984") == "1984" and prompt("Rules: be terse") == "Rules: be terse"
    assert prompt("null") is None  # str | None: null still means unset
    cfg = load_config(GenerateConfig, None, ["model=m", "sampling.max_tokens=7", "sampling.temperature=0"])
    assert cfg.sampling.max_tokens == 7 and cfg.sampling.temperature == 0.0  # numbers are still numbers
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("prompt: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8"):
        load_config(GenerateConfig, bad)
