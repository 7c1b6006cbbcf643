"""GRPO data: prompt rows from JSONL, rollouts collated into training batches, rollouts kept on disk.

    prompts = load_prompts("prompts.jsonl", tok, max_prompt_len=256)
    batch = collate_rollout(prompt_ids, completion_ids, advantages, pad_id)   # one micro batch

A prompt record is plain text `{"prompt": "2+3="}`, chat `{"prompt": [messages]}` or `{"messages": [...]}`
(a trailing assistant turn is dropped: it is the reference, not the prompt). Every other key stays in the
row the reward functions see (`answer`, `tests`, ...).

A training row is prompt + completion; `labels` mark the completion tokens only (already shifted, as for
SFT), so the loss and log-probs cover what the policy generated and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.batch import COUNT, IGNORE_INDEX
from lmforge.data.hfdata import HFDataConfig, iter_records
from lmforge.data.preference import message_list
from lmforge.errors import DataError, IntegrityError
from lmforge.model.tensorfile import load_tensors, read_metadata, save_tensors
from lmforge.tokenizer import TURN_ENDS

_EXPECTED = 'expected {"prompt": "..."}, {"prompt": [messages]} or {"messages": [messages]}'


@dataclass
class Prompt:
    ids: list[int]  # what the policy continues (chat: rendered with the generation prompt)
    text: str  # the same as text, for the reward functions
    row: dict[str, Any]  # the JSONL record
    chat: bool


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    """The prompt's messages, without a trailing assistant turn (the answer the policy is to write)."""
    out = message_list(value, where, key, _EXPECTED)
    return out[:-1] if len(out) > 1 and out[-1]["role"] == "assistant" else out


def encode_prompt_row(tok: Any, rec: dict[str, Any], where: str) -> Prompt:
    """One record -> Prompt; chat text goes through the guarded chat encoder (no forged special tokens)."""
    value = rec.get("messages", rec.get("prompt"))
    if value is None:
        raise DataError(f"{where}: no 'prompt' or 'messages' key; {_EXPECTED}")
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: empty prompt")
        return Prompt(tok.as_plain_text().encode(value), value, rec, chat=False)
    key = "messages" if "messages" in rec else "prompt"
    msgs = _messages(value, where, key)
    for i, m in enumerate(msgs):
        for special in tok.special_tokens:
            if special in m["content"]:
                raise DataError(f"{where}: {key}[{i}] contains the special token {special!r}")
    text = tok.render_chat(msgs, add_generation_prompt=True).text
    return Prompt(list(tok.encode_chat(msgs, add_generation_prompt=True)), text, rec, chat=True)


def load_prompts(
    path: str | Path, tok: Any, *, max_prompt_len: int, hf: HFDataConfig | None = None
) -> tuple[list[Prompt], int]:
    """(prompts, how many were cut to their last `max_prompt_len` tokens) from a JSONL file or a Hugging Face
    dataset (data/hfdata.py); DataError naming file:line (or dataset:row)."""
    out, cut = [], 0
    for _, where, rec in iter_records(path, hf):
        p = encode_prompt_row(tok, rec, where)
        if len(p.ids) > max_prompt_len:
            p.ids, cut = p.ids[-max_prompt_len:], cut + 1
        out.append(p)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out, cut


def stop_token(tok: Any, chat: bool) -> int:
    """The token a finished completion is trained to end with: the chat turn end, or EOS for plain text."""
    if chat:
        for t in TURN_ENDS:
            if t in tok.special_tokens:
                return int(tok.special_tokens[t])
    return int(tok.eos_id)


def collate_rollout(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    advantages: torch.Tensor,
    pad_id: int,
    *,
    per_sequence: bool = False,
) -> dict[str, torch.Tensor]:
    """Rows prompt + completion, right-padded: input_ids/labels (B, T) with labels on the completion only,
    `advantages` (B,), and `count` (one per row) when the loss is normalised per sequence."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for r, (p, s) in enumerate(zip(prompt_ids, seqs, strict=True)):
        ids[r, : len(s) - 1] = torch.tensor(s[:-1])
        labels[r, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p) :])
    out = {"input_ids": ids, "labels": labels, "advantages": advantages.float().clone()}
    if per_sequence:
        out[COUNT] = torch.ones(len(seqs), dtype=torch.long)
    return out


# -- rollouts kept for the later passes (num_iterations > 1), so a resume mid-group is exact --------------
ROLLOUTS = "rollouts"


def rollout_path(run_dir: Path, generation: int) -> Path:
    return run_dir / ROLLOUTS / f"gen-{generation:06d}.safetensors"


def save_rollout(run_dir: Path, generation: int, batches: list[dict[str, torch.Tensor]], key: str) -> None:
    tensors = {f"{m}/{k}": v.contiguous() for m, b in enumerate(batches) for k, v in b.items()}
    meta = {"generation": str(generation), "micro_batches": str(len(batches)), "fingerprint": key}
    path = rollout_path(run_dir, generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, metadata=meta)


def load_rollout(run_dir: Path, generation: int, key: str) -> list[dict[str, torch.Tensor]]:
    """The stored rollout of `generation`; IntegrityError when it is missing or from other settings."""
    path = rollout_path(run_dir, generation)
    if not path.is_file():
        raise IntegrityError(
            f"{path}: missing; resuming in the middle of a generation's num_iterations passes needs the "
            "rollout it was sampled with (resume from a checkpoint at a multiple of num_iterations)"
        )
    meta = read_metadata(path)
    if meta.get("fingerprint") != key:
        raise IntegrityError(
            f"{path}: written with other settings than this config ({json.dumps(meta)[:80]})"
        )
    tensors = load_tensors(path)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta["micro_batches"]))]
    for name, t in tensors.items():
        m, k = name.split("/", 1)
        out[int(m)][k] = t
    return out


def prune_rollouts(run_dir: Path, keep_from: int) -> None:
    """Delete stored rollouts of generations before `keep_from` (no kept checkpoint can need them)."""
    folder = run_dir / ROLLOUTS
    if not folder.is_dir():
        return
    for f in folder.glob("gen-*.safetensors"):
        if int(f.stem.removeprefix("gen-")) < keep_from:
            f.unlink(missing_ok=True)


__all__ = [
    "Prompt",
    "collate_rollout",
    "encode_prompt_row",
    "load_prompts",
    "load_rollout",
    "prune_rollouts",
    "save_rollout",
    "stop_token",
]
