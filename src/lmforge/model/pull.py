"""`lmforge model pull ORG/NAME[@REVISION]`: put a hub model in the local cache and print its folder.

    lmforge model pull HuggingFaceTB/SmolLM2-135M-Instruct          # the main branch
    lmforge model pull HuggingFaceTB/SmolLM2-135M-Instruct@v1.0     # a tag, branch or commit
    HF_HUB_OFFLINE=1 lmforge model pull ORG/NAME                     # only look in the cache

Online, the hub is asked first (a cached branch moves to its newest commit); offline, only the cache is
read. Only safetensors weights, JSON configs, tokenizer files and the card are fetched (model/hub.py). stdout is one line,
the snapshot folder, so `$(lmforge model pull ...)` works in scripts; the pinned id goes to stderr.
"""

from __future__ import annotations

import sys

from pydantic import Field

from lmforge.config import Section, parse_command
from lmforge.errors import ConfigError
from lmforge.model.hub import commit_of, is_hub_id, snapshot, split_id


class PullConfig(Section):
    """`lmforge model pull`: download (or find in the cache) a Hugging Face hub model."""

    model: str = Field(description="hub id ORG/NAME, optionally @REVISION (branch, tag or commit)")


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"model={argv[0]}", *argv[1:]]  # `model pull ORG/NAME` reads better than model=ORG/NAME
    cfg = parse_command(
        argv,
        PullConfig,
        "model pull",
        "Download a Hugging Face hub model (safetensors, configs and tokenizer only; never pickles) into the "
        "hub cache, or find it there, and print its local folder. HF_HUB_OFFLINE=1 only looks in the cache. "
        "Every command that takes base= or model= accepts the same ORG/NAME[@REVISION] and resolves it so.",
        "lmforge model pull HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    if not is_hub_id(cfg.model):
        raise ConfigError(f"model: {cfg.model!r} is not a hub id ORG/NAME[@REVISION] (or it is a local path)")
    folder = snapshot(cfg.model, refresh=True)  # online: the branch's newest commit; offline: the cache
    files = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(
        f"{split_id(cfg.model)[0]}@{commit_of(folder)}: {len(files)} files, {size / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    print(folder)
    return 0
