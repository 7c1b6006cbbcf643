"""Hugging Face hub ids as model sources: `ORG/NAME[@REVISION]` -> a local snapshot folder, cache first.

    path = local_path("HuggingFaceTB/SmolLM2-135M-Instruct")    # the cached (or downloaded) snapshot folder
    spec = pinned("HuggingFaceTB/SmolLM2-135M-Instruct")        # "HuggingFaceTB/SmolLM2-135M-Instruct@<commit>"
    local_path("runs/demo/pretrain")                            # an existing path is returned as it is

A spec is a hub id only when it is not an existing local path and looks like one (one `/`, no leading
`.` or `/`, not a .yaml/.json file name). Resolution goes through `huggingface_hub.snapshot_download`: the
local cache ($HF_HOME / $HF_HUB_CACHE) is tried first without any network; only when the snapshot is not
cached, and HF_HUB_OFFLINE is not set, is it downloaded, and then only safetensors weights, JSON configs and
tokenizer files (never pickled .bin weights; a repo without safetensors is refused). Training and export
commands record the resolved commit (`pinned`) in the config they save, so a rerun loads the same weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lmforge.errors import ConfigError, DataError

# What a model folder needs: weights, configs, the tokenizer and chat template, and the model card (its
# licence goes into the cards of what is made from it). Pickles are never fetched.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "README.md"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
_NOT_IDS = (".yaml", ".yml", ".json", ".safetensors", ".gguf", ".onnx")


def is_hub_id(spec: str | Path) -> bool:
    """`ORG/NAME` or `ORG/NAME@REV` that does not name an existing local path."""
    text = str(spec)
    if Path(text).exists() or not _HUB_ID.fullmatch(text) or ".." in text:
        return False
    return not text.split("@", 1)[0].lower().endswith(_NOT_IDS)


def split_id(spec: str) -> tuple[str, str | None]:
    """`ORG/NAME@REV` -> ("ORG/NAME", "REV"); no `@` -> revision None (the repo's main branch)."""
    repo, _, rev = spec.partition("@")
    return repo, rev or None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after it was imported."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().lower() in ("1", "on", "yes", "true")


def _how_to_get(spec: str) -> str:
    return (
        f"run `lmforge model pull {spec}` while online (HF_HUB_OFFLINE unset), or pass a local model folder"
    )


def snapshot(spec: str, refresh: bool = False) -> Path:
    """The local snapshot folder of hub id `spec`: from the cache, else downloaded unless offline.
    `refresh` (`model pull`) asks the hub first, so a cached branch moves to its newest commit."""
    repo, rev = split_id(spec)
    try:
        try:
            if refresh and not offline():
                raise LocalEntryNotFoundError("refresh")  # straight to the download below
            found = snapshot_download(
                repo, revision=rev, allow_patterns=ALLOW_PATTERNS, local_files_only=True
            )
        except LocalEntryNotFoundError:
            if offline():
                raise DataError(
                    f"model {spec}: not a local folder and not in the Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set; {_how_to_get(spec)}"
                ) from None
            found = snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        reason = (
            "is gated (log in with `hf auth login` and accept its licence)"
            if isinstance(e, GatedRepoError)
            else "does not exist on the Hugging Face hub (or is private)"
        )
        raise DataError(f"model {spec}: not a local folder, and {repo} {reason}") from None
    except RevisionNotFoundError:
        raise DataError(f"model {spec}: {repo} has no revision {rev!r} (a branch, tag or commit)") from None
    except HFValidationError as e:
        raise ConfigError(f"model {spec}: not a valid hub id ({str(e).splitlines()[0]})") from None
    except LocalEntryNotFoundError:  # online but the hub cannot be reached
        raise DataError(
            f"model {spec}: not a local folder, not in the Hugging Face cache, and the hub cannot be reached; "
            f"{_how_to_get(spec)}"
        ) from None
    return _checked(Path(found), spec)


def _checked(folder: Path, spec: str) -> Path:
    if not (folder / "config.json").is_file():
        raise DataError(f"model {spec}: the snapshot {folder} has no config.json (not a transformers model)")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"model {spec}: the repo has no safetensors weights; lmforge never loads pickled .bin/.pt files "
            "(convert them with the hub's safetensors converter, or pick a repo that ships safetensors)"
        )
    return folder


def commit_of(folder: Path) -> str:
    """The commit a cache snapshot folder holds: its name (hub cache layout snapshots/<commit>/)."""
    return folder.name


def local_path(spec: str | Path) -> Path:
    """`spec` as a local path: itself when it is not a hub id, else the snapshot folder."""
    return snapshot(str(spec)) if is_hub_id(spec) else Path(spec)


def pinned(spec: str) -> str:
    """`spec` with a hub id's revision resolved to its commit (`ORG/NAME@<commit>`); other specs unchanged."""
    if not is_hub_id(spec):
        return spec
    return f"{split_id(spec)[0]}@{commit_of(snapshot(spec))}"


__all__ = [
    "ALLOW_PATTERNS",
    "commit_of",
    "is_hub_id",
    "local_path",
    "offline",
    "pinned",
    "snapshot",
    "split_id",
]
