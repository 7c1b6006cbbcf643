"""Preference pairs for DPO: JSONL records (or Hugging Face dataset rows, data/hfdata.py) -> token ids with the prompt masked, batches, a seeded sampler.

One record per line, the prompt either plain text or a chat conversation:

    {"prompt": "2+3=", "chosen": "5", "rejected": "7"}
    {"prompt": [{"role": "user", "content": "2+3?"}], "chosen": "5", "rejected": "7"}
    {"prompt": [{"role": "user", "content": "2+3?"}],
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "7"}]}

Plain text: the sequence is `prompt + response + EOS`, special-token strings in the text are ordinary text.
Chat (any of the three is a list): the conversation is rendered with the tokenizer's chat template; the
prompt is the template with the generation prompt (`<|im_start|>assistant\\n`), the response is what the
full conversation adds after it (`5<|im_end|>\\n`), so the end-of-turn marker is a trained target.

Each pair becomes two rows, chosen and rejected, sharing the prompt; labels are the next token on the
response and -100 on the prompt. An optional numeric "margin" per record stays with its pair (the
reward model's Bradley-Terry loss subtracts it; DPO ignores it). A pair longer than `max_len` keeps the end of its prompt (at most
`max_prompt_len` tokens) and then the start of each response; such pairs are counted as truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.config import capped
from lmforge.data.batch import COUNT, IGNORE_INDEX
from lmforge.data.hfdata import HFDataConfig, iter_records
from lmforge.data.order import EpochOrder
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

KEYS = ("prompt", "chosen", "rejected")
_EXPECTED = (
    'expected {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages} '
    'with messages a list of {"role": str, "content": str}'
)


@dataclass(frozen=True)
class Pair:
    """One preference pair as token ids; responses start at index `prompt_len` of each sequence."""

    chosen: np.ndarray  # (prompt_len + chosen response,) int64
    rejected: np.ndarray
    prompt_len: int
    line: int  # where it came from, for messages about it
    margin: float = 0.0  # optional per-record "margin": how much better chosen is (reward models use it)


@dataclass
class PreferenceStats:
    records: int = 0
    pairs: int = 0
    truncated: int = 0  # pairs cut to max_len
    identical: int = 0  # skipped: chosen and rejected tokenise to the same ids
    chat: int = 0  # pairs rendered through the chat template
    response_tokens: int = 0  # chosen + rejected target tokens


def message_list(value: Any, where: str, key: str, expected: str = _EXPECTED) -> list[dict[str, str]]:
    """`value` as a list of {'role', 'content'} strings; DataError naming `where` and `key` otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: key {key!r} must be a non-empty list of messages; {expected}")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: {key}[{i}] must be {{'role': str, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_record(rec: dict[str, Any], where: str) -> None:
    for k in KEYS:
        if k not in rec:
            raise DataError(f"{where}: missing key {k!r}; {_EXPECTED}")
        v = rec[k]
        if not isinstance(v, (str, list)):
            raise DataError(
                f"{where}: key {k!r} must be a string or a list of messages, got {type(v).__name__}"
            )


class PairEncoder:
    """Record -> (prompt ids, chosen response ids, rejected response ids) for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, *, append_eos: bool = True, add_bos: bool = False) -> None:
        self.tok = tokenizer
        self.plain = tokenizer.as_plain_text()  # record text cannot forge special tokens
        self.append_eos = append_eos
        self.add_bos = add_bos

    def encode(self, rec: dict[str, Any], where: str) -> tuple[list[int], list[int], list[int], bool]:
        _check_record(rec, where)
        chat = any(isinstance(rec[k], list) for k in KEYS)
        if not chat:
            prompt = self.plain.encode(rec["prompt"], add_bos=self.add_bos)
            eos = [self.tok.eos_id] if self.append_eos else []
            responses = [self.plain.encode(rec[k]) + eos for k in ("chosen", "rejected")]
        else:
            p = rec["prompt"]
            msgs = (
                [{"role": "user", "content": p}] if isinstance(p, str) else message_list(p, where, "prompt")
            )
            self._check_special(msgs, where, "prompt")
            head = self.tok.render_chat(msgs, add_generation_prompt=True).text
            prompt = self.tok.encode_chat(msgs, add_generation_prompt=True, add_bos=self.add_bos)
            responses = []
            for k in ("chosen", "rejected"):
                r = rec[k]
                turn = (
                    [{"role": "assistant", "content": r}] if isinstance(r, str) else message_list(r, where, k)
                )
                self._check_special(turn, where, k)
                full = self.tok.render_chat(msgs + turn)
                if not full.text.startswith(head):
                    raise DataError(
                        f"{where}: the chat template does not render the prompt with a generation prompt as "
                        f"a prefix of prompt + {k}; use plain-text records for this tokenizer"
                    )
                # Encoded apart from the prompt, as at generation time; the reply and its end-of-turn
                # marker are targets, the newline after the marker is not (as in SFT, data/chat.py).
                responses.append(self.tok.encode_rendered(full, len(head), len(full.text.rstrip()))[0])
        for k, r in zip(("chosen", "rejected"), responses, strict=True):
            if not r:
                raise DataError(f"{where}: key {k!r} is an empty response (nothing to compare)")
        return prompt, responses[0], responses[1], chat

    def _check_special(self, messages: list[dict[str, str]], where: str, key: str) -> None:
        """Chat text is encoded with special tokens live: a marker inside a message would forge a turn."""
        for i, m in enumerate(messages):
            for special in self.tok.special_tokens:
                if special in m["content"]:
                    raise DataError(f"{where}: {key}[{i}] contains the special token {special!r}")


def _margin(rec: dict[str, Any], where: str) -> float:
    m = rec.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m:
        raise DataError(f"{where}: key 'margin' must be a number, got {m!r:.40}")
    return float(m)


def _fit(
    prompt: list[int], chosen: list[int], rejected: list[int], max_len: int, max_prompt_len: int
) -> tuple[list[int], list[int], list[int], bool]:
    """Keep the prompt's end and the responses' starts so each sequence has at most max_len tokens."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_len:
        prompt = prompt[-max_prompt_len:]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def load_pairs(
    path: Path | str,
    tokenizer: Tokenizer,
    *,
    max_len: int,
    max_prompt_len: int,
    append_eos: bool = True,
    add_bos: bool = False,
    hf: HFDataConfig | None = None,
) -> tuple[list[Pair], PreferenceStats]:
    """Read and tokenise a preference JSONL file or HF dataset; DataError with file:line for a bad record."""
    assert 0 < max_prompt_len < max_len, "checked by the config"
    enc = PairEncoder(tokenizer, append_eos=append_eos, add_bos=add_bos)
    pairs: list[Pair] = []
    stats = PreferenceStats()
    for line, where, rec in iter_records(path, hf):
        stats.records += 1
        prompt, chosen, rejected, chat = enc.encode(rec, where)
        margin = _margin(rec, where)
        prompt, chosen, rejected, cut = _fit(prompt, chosen, rejected, max_len, max_prompt_len)
        if chosen == rejected:
            stats.identical += 1
            continue
        stats.truncated += int(cut)
        stats.chat += int(chat)
        stats.response_tokens += len(chosen) + len(rejected)
        pairs.append(
            Pair(
                chosen=np.asarray(prompt + chosen, dtype=np.int64),
                rejected=np.asarray(prompt + rejected, dtype=np.int64),
                prompt_len=len(prompt),
                line=line,
                margin=margin,
            )
        )
    stats.pairs = len(pairs)
    if not pairs:
        raise DataError(
            f"{path}: no usable preference pairs ({stats.records} records, {stats.identical} identical)"
        )
    return pairs, stats


def split_pairs(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): a seeded random `fraction` of the pairs (at least one) is held out."""
    if fraction <= 0:
        return pairs, []
    n_eval = max(1, round(len(pairs) * fraction))
    if n_eval >= len(pairs):
        raise DataError(f"eval_fraction {fraction} leaves no training pairs out of {len(pairs)}")
    order = np.random.default_rng([seed, 7]).permutation(len(pairs))
    held = set(order[:n_eval].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


class _HeldOutConfig(Protocol):
    @property
    def max_pairs(self) -> int: ...


class PairDataConfig(Protocol):
    """The keys of a preference-trained command (`align dpo`, `align reward`) that say what it reads."""

    @property
    def model(self) -> str: ...
    @property
    def data(self) -> str: ...
    @property
    def eval_data(self) -> str | None: ...
    @property
    def eval_fraction(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def max_len(self) -> int: ...
    @property
    def max_prompt_len(self) -> int: ...
    @property
    def append_eos(self) -> bool: ...
    @property
    def hf(self) -> HFDataConfig: ...
    @property
    def eval(self) -> _HeldOutConfig: ...


def capped_max_len(cfg: PairDataConfig, limit: int) -> int:
    """`max_len` capped at the model's context (with a notice); the prompt must still leave room."""
    max_len = capped("max_len", cfg.max_len, limit, f"the context of {cfg.model}")
    if cfg.max_prompt_len >= max_len:
        raise ConfigError(
            f"max_prompt_len ({cfg.max_prompt_len}) must be below max_len ({max_len}, the model's context)"
        )
    return max_len


def train_and_held_pairs(
    cfg: PairDataConfig, tok: Tokenizer
) -> tuple[list[Pair], list[Pair], PreferenceStats]:
    """(training pairs, held-out pairs, statistics of `data`): eval_data, or a seeded share of `data`."""
    opts: dict[str, Any] = {
        "max_len": cfg.max_len,
        "max_prompt_len": cfg.max_prompt_len,
        "append_eos": cfg.append_eos,
        "hf": cfg.hf,
    }
    pairs, stats = load_pairs(cfg.data, tok, **opts)
    if cfg.eval_data:
        train_pairs, held = pairs, load_pairs(cfg.eval_data, tok, **opts)[0]
    else:
        train_pairs, held = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    held = held[: cfg.eval.max_pairs] if cfg.eval.max_pairs else held
    return train_pairs, held, stats


def collate(pairs: Sequence[Pair], pad_id: int, ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rows [chosen_0..chosen_{m-1}, rejected_0..rejected_{m-1}], right-padded to the longest.

    input_ids (2m, T) and labels (2m, T) are already shifted (labels[t] = the token after input t);
    `count` (m,) ones: the loop normalises DPO per pair. `ref` (m, 2): reference log-probs, if precomputed.
    """
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.prompt_len for p in pairs] * 2
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        t = torch.from_numpy(s)
        ids[i, : len(s) - 1] = t[:-1]
        labels[i, start - 1 : len(s) - 1] = t[start:]  # targets: the response tokens only
    batch = {"input_ids": ids, "labels": labels, COUNT: torch.ones(len(pairs))}
    if ref is not None:
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # (2m,) in row order
    return batch


class PairSampler:
    """Global batch `step` -> this rank's micro batches of pairs: a seeded pure function of the step.

    Each epoch visits every pair once in the order of `default_rng([seed, epoch]).permutation`; the state
    to save is (seed, step), as for token windows (train/sampler.py).
    """

    def __init__(
        self,
        pairs: list[Pair],
        *,
        global_batch: int,
        micro_batch: int,
        pad_id: int,
        ref: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        collate_fn: Callable[..., dict[str, torch.Tensor]] = collate,
    ) -> None:
        assert global_batch % (micro_batch * world_size) == 0, "checked by the config"
        assert pairs, "checked by load_pairs"
        self.pairs = pairs
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.pad_id = pad_id
        self.ref = ref  # (N, 2) reference log-probs of every pair, or None (computed live)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.order = EpochOrder(len(pairs), seed)
        self.collate = collate_fn  # DPO's shifted rows, or a reward model's whole sequences

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def global_indices(self, step: int) -> np.ndarray:
        return self.order.batch(step, self.global_batch)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch // self.world_size
        rows = self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        out = []
        for m in range(self.accum_steps):
            idx = rows[m * self.micro_batch : (m + 1) * self.micro_batch]
            ref = self.ref[torch.from_numpy(idx)] if self.ref is not None else None
            out.append(self.collate([self.pairs[int(i)] for i in idx], self.pad_id, ref))
        return out

    def state(self, step: int) -> dict[str, int]:
        return {"seed": self.seed, "step": step, "global_batch": self.global_batch, "pairs": len(self.pairs)}


def score_collate(
    pairs: Sequence[Pair], pad_id: int, ref: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A reward model's batch: whole sequences [chosen_0..chosen_{m-1}, rejected_0..rejected_{m-1}]
    right-padded with `pad_id` (2m, T), each pair's `margin` (m,) and `count` (m,) ones (per-pair loss)."""
    del ref  # no reference model
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "margin": margin, COUNT: torch.ones(len(pairs))}


def fixed_batches(pairs: list[Pair], batch_size: int) -> list[list[int]]:
    """Pair indices of fixed evaluation / precomputation batches, in order."""
    return [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
