"""Supervised fine-tuning data: records -> token ids + a loss mask, packed into training rows.

    cfg = SFTDataConfig(train=["data/train.jsonl"], val_fraction=0.05)
    data = load_sft(cfg, tokenizer, seq_len=512, seed=0)   # data.train / data.val: list[Example]; data.stats
    rows = pack(data.train, seq_len=512)                   # example indices per training row
    batch = collate([[data.train[i] for i in row] for row in rows[:8]], pad_id=tok.pad_id, packed=True)

Record formats (one JSON object per line; detected from a file's first record unless `format` says):
    chat               {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
    prompt_completion  {"prompt": "...", "completion": "...", "system": "... (optional)"}
    alpaca             {"instruction": "...", "input": "... (optional)", "output": "..."}
Every record is rendered through the tokenizer's chat template (prompt/completion and Alpaca become one
user turn and one assistant turn). `template: plain` skips the template for prompt/completion and Alpaca:
the text is prompt + completion + EOS, for base models whose tokenizer has no chat markers.

Which tokens are learned: the conversation is rendered prefix by prefix. For assistant turn i,
`render(messages[:i], add_generation_prompt=True)` ends where the reply starts and `render(messages[:i+1])`
ends where it stops; tokens whose character offset falls in between are targets (the reply and the
template's end-of-turn marker, e.g. `<|im_end|>`, so the model learns to stop; not the newline after it).
This works for any template that renders a conversation prefix by prefix (ChatML, Llama 3, Qwen2, ...),
without template-specific code. `loss_on: all` learns every token instead.

Packing: examples are laid end to end in rows of `seq_len` positions; position ids restart at 0 for each
example and a block-diagonal causal mask stops attention across examples, so a packed example sees
exactly what it would see alone (the test checks the losses agree to 1e-5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from lmforge.config import ConfigPath, Section
from lmforge.data.batch import IGNORE_INDEX
from lmforge.data.hfdata import HFDataConfig, iter_records
from lmforge.errors import DataError
from lmforge.tokenizer import CHATML_TEMPLATE

Format = Literal["chat", "prompt_completion", "alpaca"]
ROLES = ("system", "user", "assistant")
_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


class SFTDataConfig(Section):
    train: list[ConfigPath] = Field(
        ...,
        description="training JSONL file(s) or Hugging Face datasets (data/hfdata.py): chat, "
        "prompt/completion or Alpaca records",
    )
    val: list[ConfigPath] = Field(
        default_factory=list,
        description="validation JSONL file(s) or datasets, e.g. `hf:ORG/NAME#validation` (empty: val_fraction)",
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="hold out this share of training records (stable hash) when val is empty",
    )
    format: Literal["auto", "chat", "prompt_completion", "alpaca"] = Field(
        "auto", description="record format; auto = from the keys of each file's first record"
    )
    template: Literal["chat", "plain"] = Field(
        "chat",
        description="chat = the tokenizer's chat template; plain = prompt + completion + EOS (no chat)",
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="learn assistant replies only (labels -100 elsewhere) or every token"
    )
    packing: bool = Field(True, description="pack several examples per row (no attention across examples)")
    max_examples: int = Field(0, ge=0, description="use at most this many training records (0 = all)")
    hf: HFDataConfig = Field(
        default_factory=HFDataConfig, description="Hugging Face dataset inputs: split, columns, streaming"
    )

    @field_validator("train", "val", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


@dataclass
class Example:
    """One tokenized record: `mask[j]` says whether token j is a target (predicted from tokens < j)."""

    ids: list[int]
    mask: list[bool]
    source: str  # file:line, for messages

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


# -- records -----------------------------------------------------------------------------------------
def detect_format(rec: dict[str, Any], where: str) -> Format:
    for fmt in ("chat", "prompt_completion", "alpaca"):
        if all(k in rec for k in _KEYS[fmt]):
            return fmt
    raise DataError(
        f"{where}: cannot tell the record format from keys {sorted(rec)}; expected 'messages' (chat), "
        "'prompt' + 'completion', or 'instruction' + 'output' (Alpaca)"
    )


def _text(rec: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(rec: dict[str, Any], fmt: Format, where: str) -> list[dict[str, str]]:
    """The record as a list of {role, content} messages, validated."""
    expected = ", ".join(repr(k) for k in _KEYS[fmt])
    missing = [k for k in _KEYS[fmt] if k not in rec]
    if missing:
        raise DataError(f"{where}: {fmt} record without {missing}; expected keys {expected}")
    if fmt == "prompt_completion":
        out = [{"role": "user", "content": _text(rec, "prompt", where)}]
        system = _text(rec, "system", where, optional=True)
        if system:
            out.insert(0, {"role": "system", "content": system})
        return [*out, {"role": "assistant", "content": _text(rec, "completion", where)}]
    if fmt == "alpaca":
        prompt = _text(rec, "instruction", where)
        extra = _text(rec, "input", where, optional=True)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(rec, "output", where)},
        ]
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                f"got {str(m)[:80]}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


# -- tokenization with a loss mask ---------------------------------------------------------------------
def _check_no_special(tok: Any, messages: list[dict[str, str]], where: str) -> None:
    """Message text is encoded together with the template, so a special-token string in it would become a
    real role marker or EOS: refuse the record instead of training on a forged turn."""
    for i, m in enumerate(messages):
        for special in tok.special_tokens:
            if special in m["content"]:
                raise DataError(f"{where}: messages[{i}] contains the special token {special!r}")


def assistant_spans(
    tok: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character span of each assistant reply])."""
    full = tok.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tok.apply_chat_template(messages[: i + 1])
        if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation prefix by prefix, "
                "so assistant turns cannot be located; use data.loss_on=all or another template"
            )
        start, end = len(before), len(after)
        while end > start and after[end - 1].isspace():  # the newline after the end-of-turn marker
            end -= 1
        spans.append((start, end))
    return full, spans


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return [any(a <= s < b for a, b in spans) for s, _ in offsets]


def encode_messages(tok: Any, messages: list[dict[str, str]], loss_on: str, where: str) -> Example:
    _check_no_special(tok, messages, where)
    if loss_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from (or set data.loss_on=all)")
    spans = assistant_spans(tok, messages, where)[1] if loss_on == "assistant" else []
    ids, offsets = tok.encode_rendered(tok.render_chat(messages))
    mask = [True] * len(ids) if loss_on == "all" else _mask_from_offsets(offsets, spans)
    return Example(ids, mask, where)


def encode_plain(tok: Any, prompt: str, completion: str, loss_on: str, where: str) -> Example:
    """prompt + completion + EOS without a chat template; the completion and the EOS are the targets."""
    text = prompt + completion
    enc = tok.backend.encode(text, add_special_tokens=False)
    if loss_on == "all":
        mask = [True] * len(enc.ids)
    else:
        mask = _mask_from_offsets(enc.offsets, [(len(prompt), len(text))])
    return Example([*enc.ids, tok.eos_id], [*mask, True], where)


def encode_record(tok: Any, rec: dict[str, Any], fmt: Format, cfg: SFTDataConfig, where: str) -> Example:
    messages = to_messages(rec, fmt, where)
    if cfg.template == "plain":
        if fmt == "chat":
            raise DataError(f"{where}: chat records need data.template=chat (the tokenizer's chat template)")
        _check_no_special(tok, messages, where)
        prompt = "\n\n".join(m["content"] for m in messages[:-1])
        return encode_plain(tok, prompt, messages[-1]["content"], cfg.loss_on, where)
    return encode_messages(tok, messages, cfg.loss_on, where)


# -- loading -------------------------------------------------------------------------------------------
def _is_val(where: str, fraction: float, seed: int) -> bool:
    """Stable per record (file name + line), independent of the other records."""
    h = hashlib.blake2b(f"{seed}:{where}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def read_examples(
    paths: Sequence[str], tok: Any, cfg: SFTDataConfig, seq_len: int, stats: dict[str, Any], limit: int = 0
) -> list[Example]:
    """Tokenize every record of `paths`; truncate to seq_len + 1 tokens, drop examples left without targets."""
    out: list[Example] = []
    for name in paths:
        fmt: Format | None = None if cfg.format == "auto" else cfg.format
        for _, where, rec in iter_records(name, cfg.hf):
            if fmt is None:
                fmt = detect_format(rec, where)
            ex = encode_record(tok, rec, fmt, cfg, where)
            stats["records"] += 1
            if len(ex.ids) > seq_len + 1:
                stats["truncated"] += 1
                stats["truncated_tokens"] += len(ex.ids) - seq_len - 1
                ex = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1], ex.source)
            if ex.n_targets == 0:
                stats["dropped_no_targets"] += 1
                continue
            out.append(ex)
            if limit and len(out) >= limit:
                return out
    return out


def check_template(tok: Any, cfg: SFTDataConfig) -> None:
    """A tokenizer folder without a chat template gets lmforge's ChatML default on load; if its vocabulary
    lacks the ChatML markers, they would be spelled out in pieces: refuse rather than train on that."""
    if cfg.template == "chat" and tok.chat_template == CHATML_TEMPLATE:
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.special_tokens]
        if missing:
            raise DataError(
                f"data.template: the tokenizer has no chat template of its own and no ChatML special tokens "
                f"({', '.join(missing)}); set data.template=plain (prompt + completion + EOS) or give the "
                "tokenizer a chat_template"
            )


def load_sft(cfg: SFTDataConfig, tok: Any, *, seq_len: int, seed: int = 0) -> SFTData:
    """Training and validation examples plus counts (records, truncated, dropped, tokens, targets)."""
    check_template(tok, cfg)
    stats: dict[str, Any] = {"records": 0, "truncated": 0, "truncated_tokens": 0, "dropped_no_targets": 0}
    train = read_examples(cfg.train, tok, cfg, seq_len, stats, cfg.max_examples)
    if cfg.val:
        val = read_examples(cfg.val, tok, cfg, seq_len, stats)
    elif cfg.val_fraction > 0:
        val = [e for e in train if _is_val(e.source, cfg.val_fraction, seed)]
        train = [e for e in train if not _is_val(e.source, cfg.val_fraction, seed)]
    else:
        val = []
    if not train:
        raise DataError(f"data.train: no usable training examples in {', '.join(cfg.train)}")
    stats.update(
        train_examples=len(train),
        val_examples=len(val),
        train_tokens=sum(len(e.ids) for e in train),
        train_targets=sum(e.n_targets for e in train),
    )
    return SFTData(train, val, stats)


# -- packing and batches -------------------------------------------------------------------------------
def pack(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Next-fit packing in data order: rows of example indices, each row at most `seq_len` positions
    (an example of n tokens takes n - 1 positions: inputs ids[:-1], targets ids[1:])."""
    rows: list[list[int]] = []
    used = seq_len + 1  # forces a new row for the first example
    for i, ex in enumerate(examples):
        n = len(ex.ids) - 1
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def block_causal_mask(
    segments: torch.Tensor, positions: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """(B, T) segment ids and positions -> bool (B, 1, T, T): attend within the same example, causally."""
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = same & causal
    if window is not None:
        allowed &= positions[:, None, :] > positions[:, :, None] - window
    return allowed[:, None]


def collate(
    rows: Sequence[Sequence[Example]], pad_id: int, *, packed: bool, window: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, labels[, position_ids, attn_mask]} of the longest row's length.

    Unpacked rows (one example each) need neither positions nor a mask: padding sits after the tokens, so
    causal attention never reaches it. Packed rows get per-example positions and a block-diagonal mask.
    """
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    B = len(rows)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # padding: its own segment
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row):
            n = len(ex.ids) - 1
            ids = torch.tensor(ex.ids, dtype=torch.long)
            mask = torch.tensor(ex.mask[1:], dtype=torch.bool)
            inputs[b, t : t + n] = ids[:-1]
            labels[b, t : t + n] = torch.where(mask, ids[1:], IGNORE_INDEX)
            positions[b, t : t + n] = torch.arange(n)
            segments[b, t : t + n] = s
            t += n
    batch = {"input_ids": inputs, "labels": labels}
    if packed and any(len(row) > 1 for row in rows):
        batch["position_ids"] = positions
        batch["attn_mask"] = block_causal_mask(segments, positions, window)
    return batch
