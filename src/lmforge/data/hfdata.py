"""Hugging Face `datasets` as input: one reader of rows for every command that reads records.

    cfg = HFDataConfig(split="train", columns={"prompt": "question"})
    for n, where, rec in iter_records("hf:org/name:config@v1.0", cfg):   # or a JSONL path, unchanged
        ...  # n: 1-based row (JSONL: line), where: "spec[split]:n" for messages, rec: dict

Sources (`is_hf_source`):
    a folder written by `Dataset.save_to_disk`      (has state.json)         split ignored
    a folder written by `DatasetDict.save_to_disk`  (has dataset_dict.json)  split picks one
    an `.arrow` file written by `datasets`                                   memory-mapped
    `hf:ORG/NAME[:config][@revision]`               a hub dataset id
Any of them may end in `#SPLIT`, which overrides `split` for that source (e.g. `data/qa#validation`).

A hub id is resolved cache first: a snapshot in the Hugging Face hub cache (as `hf download` writes it) is
read without any network; then the `datasets` cache; only then, unless HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE is set, the hub. `streaming: true` reads hub ids row by row (bounded memory, no Arrow
copy written); saved folders and Arrow files are memory-mapped, so memory stays bounded either way.
`columns` maps the names a command expects to the dataset's own (`{prompt: question}`): the record then
holds both. Everything that is not one of these sources goes to the JSONL reader (`io.iter_jsonl`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError, DataError
from lmforge.io import iter_jsonl
from lmforge.model.hub import offline as hub_offline

HF_PREFIX = "hf:"
_TRUE = ("1", "on", "yes", "true")


class HFDataConfig(Section):
    split: str = Field(
        "train", description="split of a DatasetDict folder or hub dataset (`SOURCE#SPLIT` overrides it)"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="names the command expects -> the dataset's columns, e.g. {prompt: question}",
    )
    streaming: bool = Field(
        False, description="hub ids: stream rows instead of building an Arrow copy (bounded memory)"
    )


@dataclass(frozen=True)
class HubId:
    repo: str
    config: str | None
    revision: str | None


def _split_suffix(spec: str) -> tuple[str, str | None]:
    base, sep, split = spec.rpartition("#")
    return (base, split) if sep and base and split else (spec, None)


def parse_hub_id(spec: str) -> HubId:
    """`hf:ORG/NAME[:config][@revision]` -> its parts; ConfigError naming the spec otherwise."""
    body = _split_suffix(spec)[0].removeprefix(HF_PREFIX)
    body, _, revision = body.partition("@")
    repo, _, config = body.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{spec}: expected hf:ORG/NAME[:config][@revision]")
    return HubId(repo, config or None, revision or None)


def is_hf_source(spec: str | Path) -> bool:
    """A hub id, a `save_to_disk` folder (Dataset or DatasetDict) or an `.arrow` file, `#SPLIT` allowed."""
    base = _split_suffix(str(spec))[0]
    if base.startswith(HF_PREFIX):
        return True
    path = Path(base).expanduser()
    if path.is_dir():
        return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return path.suffix == ".arrow" and path.is_file()


def offline() -> bool:
    value = os.environ.get("HF_DATASETS_OFFLINE", "")
    return hub_offline() or value.strip().lower() in _TRUE


def _how_to_get(hub: HubId) -> str:
    rev = f" --revision {hub.revision}" if hub.revision else ""
    return f"download it once while online: `hf download {hub.repo} --repo-type dataset{rev}`"


def _unknown_split(spec: str, split: str, available: Iterable[str]) -> DataError:
    return DataError(f"{spec}: no split {split!r}; available: {', '.join(sorted(available))} (set hf.split)")


def _load_hub(spec: str, split: str, streaming: bool) -> Any:
    import datasets

    hub = parse_hub_id(spec)
    try:
        folder = snapshot_download(
            hub.repo, repo_type="dataset", revision=hub.revision, local_files_only=True
        )
        source, revision = folder, None  # the cached snapshot, read without network
    except LocalEntryNotFoundError:
        source, revision = hub.repo, hub.revision  # the `datasets` cache, then the hub unless offline
    except HFValidationError as e:
        raise ConfigError(f"{spec}: not a valid hub id ({str(e).splitlines()[0]})") from None
    # `datasets` reads the offline variables once, at import: honour them as they are now.
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = was_offline or offline()
    try:
        return datasets.load_dataset(
            source, name=hub.config, revision=revision, split=split, streaming=streaming
        )
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{spec}: {str(e).splitlines()[0]} (set hf.split)") from None
        raise DataError(f"{spec}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        where = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" if offline() else "it cannot be fetched"
        raise DataError(
            f"{spec}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where} "
            f"({str(e).splitlines()[0][:120]}); {_how_to_get(hub)}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def _load_local(spec: str, path: Path, split: str) -> Any:
    import datasets

    try:
        if path.is_file():
            return datasets.Dataset.from_file(str(path))
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # pyarrow / datasets raise a wide family on a damaged folder
        raise DataError(f"{spec}: not a readable datasets folder or Arrow file ({str(e)[:120]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise _unknown_split(spec, split, loaded.keys())
        return loaded[split]
    return loaded


def open_dataset(spec: str, cfg: HFDataConfig) -> tuple[Any, str]:
    """(a `datasets` Dataset or IterableDataset, the label its rows carry) for an HF source."""
    import datasets

    datasets.disable_progress_bars()
    base, override = _split_suffix(spec)
    split = override or cfg.split
    if base.startswith(HF_PREFIX):
        return _load_hub(spec, split, cfg.streaming), f"{base}[{split}]"
    path = Path(base).expanduser()
    ds = _load_local(spec, path, split)
    # rows name their split when the source has several
    return ds, f"{base}[{split}]" if (path / "dataset_dict.json").is_file() else base


def column_names(dataset: Any) -> list[str]:
    names = dataset.column_names
    if names is None:  # a streamed dataset without declared features
        names = list(next(iter(dataset), {}))
    return list(names)


def check_columns(spec: str, available: list[str], wanted: dict[str, str]) -> None:
    """Each wanted column exists; DataError `<key>: no column 'x' in <spec>; available: ...` otherwise."""
    for key, column in wanted.items():
        if column not in available:
            raise DataError(
                f"{key}: no column {column!r} in {spec}; available: {', '.join(available) or 'none'}"
            )


def iter_rows(spec: str, cfg: HFDataConfig) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(1-based row, `label:row`, record with `columns` applied) of an HF source, streamed in order."""
    ds, label = open_dataset(spec, cfg)
    check_columns(spec, column_names(ds), {f"hf.columns.{k}": v for k, v in cfg.columns.items()})
    for n, row in enumerate(ds, 1):
        rec = dict(row)
        for ours, theirs in cfg.columns.items():
            rec[ours] = row[theirs]
        yield n, f"{label}:{n}", rec


def iter_records(
    spec: str | Path, cfg: HFDataConfig | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(row or line number, `source:n`, record) of an HF source or a JSONL file (read as before)."""
    if is_hf_source(spec):
        yield from iter_rows(str(spec), cfg or HFDataConfig())
        return
    for line, rec in iter_jsonl(Path(spec)):
        yield line, f"{Path(spec)}:{line}", rec


def source_signature(spec: str) -> list[Any]:
    """What identifies a source's content for resume checks: every file's (name, size, mtime) of a local
    source; the id itself for a hub dataset (pin a revision to make it exact)."""
    base = Path(_split_suffix(spec)[0]).expanduser()
    if spec.startswith(HF_PREFIX) or not base.exists():
        return [spec]
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return [[p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


__all__ = [
    "HFDataConfig",
    "HubId",
    "check_columns",
    "column_names",
    "is_hf_source",
    "iter_records",
    "iter_rows",
    "offline",
    "open_dataset",
    "parse_hub_id",
    "source_signature",
]
