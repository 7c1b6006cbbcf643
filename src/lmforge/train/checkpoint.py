"""Crash-safe training checkpoints for exact resume: safetensors + JSON, never pickle.

    <run>/checkpoints/step-000100/
        model.safetensors       full (consolidated) weights, keyed by parameter name
        optimizer.safetensors   every optimizer state tensor, keyed "<param name>/<state key>"
        optimizer.json          param groups and non-tensor state (the structure of the above)
        rng-<rank>.json         torch (CPU, CUDA), numpy and Python RNG states of each rank
        state.json              step, sampler position, schedule, counters, config
        model_config.json       the model's architecture (as a finished run's model/model_config.json)
        files.json              SHA-256 and size of every file above, and of itself; written last

A checkpoint is written into `step-000100.tmp`, every file fsynced, then renamed; a directory named
`step-NNNNNN` holding `state.json` is complete by construction, and `latest_checkpoint` picks the newest
one. A process killed mid-save leaves only a `.tmp` directory, which is ignored and cleaned up later.
Loading verifies every file against files.json before reading any of it (model/integrity.py, which
`lmforge generate` & co. share): a flipped byte anywhere is an IntegrityError naming the file, never weights
trained on silently. Pruning renames an old checkpoint to
`pruned-step-NNNNNN` before deleting it, so a kill mid-delete leaves nothing `latest_checkpoint` could pick.
With FSDP the weights and optimizer state are gathered into full tensors on save (collective on all ranks)
and re-sharded on load, so a checkpoint does not depend on the number of processes that wrote it.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.errors import IntegrityError
from lmforge.io import atomic_write_json, fsync_dir, publish_dir, sha256_file
from lmforge.model.config import write_model_config
from lmforge.model.integrity import (
    CHECKPOINT_STATE,
    FILE_LIST,
    list_checkpoints,
    list_digest,
    verify_checkpoint,
)
from lmforge.model.tensorfile import load_tensors, save_tensors

CHECKPOINTS = "checkpoints"
STATE = CHECKPOINT_STATE
PRUNED = "pruned-"  # prefix of a checkpoint being deleted: never matches CHECKPOINT_NAME
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)  # what a damaged file raises


def _noop() -> None:
    pass


def _before_commit(tmp: Path) -> None:
    """Seam between writing the files and the rename (tests use it to kill a process mid-save)."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Every RNG this process may draw from, JSON-encodable."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _options(cpu_offload: bool = False) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors keyed "<param>/<key>[/<key>...]" (nested dicts, e.g. bitsandbytes' wrapped 8-bit state,
    become deeper paths; parameter names never contain "/"), everything else into the JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()

    def walk(name: str, prefix: str, entry: dict[str, Any], out: dict[str, Any]) -> None:
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                # Shared storage (bitsandbytes' one quantisation map for every parameter) is refused by
                # safetensors: each key gets its own copy.
                ptr = t.untyped_storage().data_ptr()
                if ptr in storages:
                    t = t.clone()
                storages.add(ptr)
                tensors[f"{name}/{prefix}{key}"] = t
            elif isinstance(value, dict):
                walk(name, f"{prefix}{key}/", value, out.setdefault(key, {}))
            else:
                out[key] = value

    for name, entry in osd["state"].items():
        walk(name, "", entry, scalars.setdefault(name, {}))
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, entry in meta["scalars"].items():
        state[name] = json.loads(json.dumps(entry))  # a private copy, nested dicts included
    for flat, value in tensors.items():
        name, *path, key = flat.split("/")
        node = state.setdefault(name, {})
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def remove_stale(root: Path) -> None:
    """Delete what a killed process left behind: half-written `.tmp` saves and half-pruned checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return
    for stale in [*root.glob("step-*.tmp"), *root.glob(f"{PRUNED}*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest `keep` checkpoints, and step `protect` (the best one) wherever it is. Each older one
    is first renamed out of `list_checkpoints`' sight, so a kill during the (non-atomic) delete leaves a
    `pruned-` leftover, never a broken step."""
    for step, old in list_checkpoints(root)[:-keep]:
        if step == protect:
            continue
        aside = root / f"{PRUNED}{old.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(old, aside)
        fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)


def write_file_manifest(directory: Path) -> Path:
    """files.json: SHA-256 and size of every file of a checkpoint, plus the hash of that list itself
    (so a damaged manifest is told apart from damaged data)."""
    directory = Path(directory)
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != FILE_LIST
    }
    body: dict[str, Any] = {"version": 1, "files": files}
    path = directory / FILE_LIST
    atomic_write_json(path, {**body, "manifest_sha256": list_digest(body)})
    return path


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    rank: int = 0,
    keep: int = 0,
    rng: dict[str, Any] | None = None,
    barrier: Callable[[], None] = _noop,
    model_config: BaseModel | None = None,
    protect: int | None = None,
) -> Path:
    """Write checkpoint `step` under `root`; every rank must call it (FSDP gathers are collective).

    `rng` is this rank's RNG state to record (default: the current one); the loop passes the state from
    the start of the step when it stops in the middle of a gradient-accumulation cycle. `model_config`
    (the model's architecture) is saved as model_config.json when given. Pruning to the newest `keep`
    spares step `protect` (the best checkpoint of early stopping).
    """
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    model_sd: dict[str, Any] = get_model_state_dict(model, options=_options(cpu_offload=True))
    optim_sd: Any = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
    barrier()
    atomic_write_json(tmp / f"rng-{rank}.json", rng if rng is not None else rng_state())
    barrier()
    if rank == 0:
        _write_files(tmp, step, model_sd, optim_sd, state, model_config)
        _before_commit(tmp)
        publish_dir(tmp, final)  # replaces a same-step checkpoint without a moment with neither
        # Later steps belong to a timeline abandoned by resuming from an earlier checkpoint: set them
        # aside (not deleted, not picked by --resume auto), so pruning never removes what was just saved.
        for later_step, later in list_checkpoints(root):
            if later_step > step:
                os.replace(later, root / f"superseded-{later.name}")
        if keep > 0:
            _prune(root, keep, protect)
    barrier()
    return final


def _write_files(
    tmp: Path,
    step: int,
    model_sd: dict[str, Any],
    optim_sd: Any,
    state: dict[str, Any],
    model_config: BaseModel | None,
) -> None:
    """Rank 0's files of a checkpoint, each fsynced, the manifest of all of them (rng files included) last."""
    # Tied weights share storage, which safetensors refuses: store each name's own copy.
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in model_sd.items()}
    save_tensors(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    tensors, meta = _flatten_optimizer(optim_sd)
    save_tensors(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    atomic_write_json(tmp / "optimizer.json", meta)
    for f in ("model.safetensors", "optimizer.safetensors"):
        _fsync_file(tmp / f)
    if model_config is not None:
        write_model_config(tmp, model_config)
    atomic_write_json(tmp / STATE, {**state, "step": step})
    write_file_manifest(tmp)
    fsync_dir(tmp)


def read_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state: dict[str, Any] = json.loads((path / STATE).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path / STATE}: unreadable checkpoint state ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise IntegrityError(f"{path / STATE}: not a checkpoint state (no integer 'step')")
    return state


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise IntegrityError(f"{file}: missing; not a complete lmforge checkpoint")
    return _load_tensors(file)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(file)
    except _UNREADABLE as e:
        raise IntegrityError(f"{file}: unreadable safetensors file ({e})") from None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text("utf-8"))
    except _UNREADABLE as e:
        raise IntegrityError(f"{file}: unreadable JSON ({type(e).__name__})") from None


def restore_weights(path: Path, model: nn.Module, *, rank: int = 0) -> None:
    """Load only the weights of checkpoint `path` into `model` (verified first); every rank calls it."""
    verify_checkpoint(Path(path), names=["model.safetensors"], rank=rank)
    set_model_state_dict(model, dict(load_weights(Path(path))), options=_options())


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, rank: int = 0
) -> dict[str, Any]:
    """Verify checkpoint `path`, then restore weights, optimizer state and this rank's RNG state;
    returns the contents of state.json.

    Every rank reads the full tensors (the checkpoint directory must be visible to all nodes) and FSDP
    keeps its own shard. A rank that did not exist when the checkpoint was written keeps its seeded RNG.
    """
    path = Path(path)
    verify_checkpoint(path, rank=rank)
    state = read_state(path)
    weights: dict[str, Any] = dict(load_weights(path))
    set_model_state_dict(model, weights, options=_options())
    if optimizer is not None:
        tensors = _load_tensors(path / "optimizer.safetensors")
        meta = _read_json(path / "optimizer.json")
        try:
            osd = _unflatten_optimizer(tensors, meta)
        except _UNREADABLE as e:
            raise IntegrityError(f"{path / 'optimizer.json'}: not optimizer metadata ({e!r})") from None
        set_optimizer_state_dict(model, optimizer, osd, options=_options())
    rng_file = path / f"rng-{rank}.json"
    if rng_file.is_file():
        try:
            set_rng_state(_read_json(rng_file))
        except _UNREADABLE as e:
            raise IntegrityError(f"{rng_file}: not an RNG state ({e!r})") from None
    return state
