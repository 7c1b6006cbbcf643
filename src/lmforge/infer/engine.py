"""The inference engine: batched generation with a preallocated KV cache, sampling, stop rules, streaming.

    from lmforge.model.source import load_model
    from lmforge.infer.engine import Engine, GenerationRequest
    from lmforge.infer.sampling import SamplingParams
    model, tok = load_model("runs/demo/pretrain")
    engine = Engine(model, tok)
    [c] = engine.generate([GenerationRequest(tok.encode("To be"), SamplingParams(max_tokens=20, temperature=0))])
    for ev in engine.stream(GenerationRequest(tok.encode("To be"), SamplingParams(seed=1))):
        print(ev.text, end="", flush=True)

How a batch runs:

    prompts, left-padded to P      KV cache (B, kv_heads, P + max_new - 1, head_dim), allocated once
    [pad pad  a  b  c]             prefill: one forward over (B, P); logits of the last position only
    [ d   e   f  g  h]             decode: one forward per step over (B, 1); finished rows feed a pad token
                                   and keep their slot, so every step has the same batch shape

Each row has its own positions (a padded row's first real token is position 0) and a mask that hides the
padding, so a row's tokens do not depend on the other rows; with equal-length prompts no mask is built and
SDPA's causal kernel runs. The logits of a row go through `sampling.sample` with the row's own seeded
generator. Text is detokenized incrementally (a window of a few tokens, as vLLM does) and a delta is only
emitted once it is whole UTF-8 and cannot be the start of a stop string.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import DataError
from lmforge.infer.sampling import SamplingParams, make_generator, sample
from lmforge.model.transformer import KVCache, Transformer

_CONTEXT_TOKENS = 6  # prompt tokens decoded along with the output, so "▁word" pieces keep their space
_MAX_HELD_TOKENS = 4  # a UTF-8 character has at most 4 bytes: stop waiting for it after 4 more tokens


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    cancelled: threading.Event | None = None
    # (row logits (vocab,), previous token id) -> logits, before sampling: e.g. infer.watermark.Watermark
    logits_hook: Callable[[Tensor, int], Tensor] | None = None


@dataclass
class TokenEvent:
    """What one row produced at one step. `token_id` is None when the row ends without a new output token
    (EOS, a stop token, cancellation); `text` is the new text, possibly "" while a character or a possible
    stop string is incomplete."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class Completion:
    token_ids: list[int]  # output tokens, without a terminating EOS / stop token
    text: str  # output text, cut before a stop string
    finish_reason: str
    prompt_tokens: int


class Detokenizer:
    """Incremental decode of one row's output, with stop strings held back until they are decided."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0  # ids[prefix:read] is the decoded window the next delta is measured against
        self.read = len(self.ids)
        self.text = ""  # all decoded output text so far
        self.emitted = 0  # chars of `text` already handed out
        self.stop = list(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.searched = 0  # chars of `text` already searched for stop strings
        self.stopped = False  # a stop string was found: `text` is final

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._advance(final=False)

    def _advance(self, final: bool) -> None:
        if self.read == len(self.ids) or self.stopped:
            return
        new = self.tok.decode(self.ids[self.prefix :])
        if new.endswith("\ufffd") and not final and len(self.ids) - self.read < _MAX_HELD_TOKENS:
            return  # the last token ends inside a multi-byte character: wait for the rest
        old = self.tok.decode(self.ids[self.prefix : self.read])
        self.text += new[len(old) :]
        self.prefix, self.read = self.read, len(self.ids)

    def find_stop(self) -> bool:
        """Cut `text` before the first stop string, if one has appeared; True when it did."""
        if not self.stop:
            return False
        start = max(0, self.searched - self.longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self.searched = len(self.text)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def delta(self, final: bool = False) -> str:
        """New text safe to show: whole characters, minus a tail that may still grow into a stop string."""
        if final:
            self._advance(final=True)
        end = len(self.text)
        if not final:
            for k in range(min(self.longest_stop - 1, end - self.emitted), 0, -1):
                tail = self.text[end - k :]
                if any(s.startswith(tail) for s in self.stop):
                    end -= k
                    break
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


class _Row:
    """Per-request state inside a running batch."""

    def __init__(self, req: GenerationRequest, tokenizer: Any, budget: int, device: torch.device) -> None:
        self.req = req
        self.params = req.params
        self.budget = budget  # most tokens this row may produce (max_tokens, capped by max_seq_len)
        self.generator = make_generator(req.params, device)
        self.detok = Detokenizer(tokenizer, req.prompt_ids, req.params.stop)
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops.add(int(tokenizer.eos_id))
        self.stop_ids = stops
        self.out: list[int] = []
        self.done = False


class Engine:
    """Batched generation over one `Transformer`; see the module docstring. Not thread-safe by design."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        compile: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
        model.fuse_projections()  # q/k/v and gate/up as one matmul each (Llama)
        # The cache buffers are static; the filled length is a Python int that dynamo treats as symbolic,
        # so one compiled graph serves every decode step (and one every prefill shape).
        self._forward = torch.compile(self._forward_impl, dynamic=True) if compile else self._forward_impl

    # -- model call -----------------------------------------------------------------------------------
    def _forward_impl(self, ids: Tensor, pos: Tensor | None, mask: Tensor | None, cache: KVCache) -> Tensor:
        """Logits (B, vocab) of the last position of `ids` (B, T); appends T positions to `cache`.

        With left padding `pos` holds each row's own positions, which may lie below the cache slots.
        """
        return self.model(ids, pos, cache, mask, last_only=True)[:, 0]

    # -- public API -----------------------------------------------------------------------------------
    def stream_batch(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenEvent]]:
        """One list of events per decoding step; batches above `max_batch_size` run one chunk after another."""
        for first in range(0, len(requests), self.max_batch_size):
            yield from self._run(requests[first : first + self.max_batch_size], first)

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        for events in self.stream_batch([request]):
            yield from events

    def generate(
        self, requests: Sequence[GenerationRequest], on_finish: Callable[[], object] | None = None
    ) -> list[Completion]:
        """Every request to its end; `on_finish()` is called as each one finishes (progress)."""
        ids: list[list[int]] = [[] for _ in requests]
        texts: list[list[str]] = [[] for _ in requests]
        reasons = ["length"] * len(requests)
        for events in self.stream_batch(requests):
            for ev in events:
                if ev.token_id is not None:
                    ids[ev.index].append(ev.token_id)
                texts[ev.index].append(ev.text)
                if ev.finish_reason is not None:
                    reasons[ev.index] = ev.finish_reason
                    if on_finish is not None:
                        on_finish()
        return [
            Completion(ids[i], "".join(texts[i]), reasons[i], len(r.prompt_ids))
            for i, r in enumerate(requests)
        ]

    # -- one batch ------------------------------------------------------------------------------------
    def _check(self, req: GenerationRequest, i: int) -> None:
        n, vocab = len(req.prompt_ids), self.cfg.vocab_size
        if n == 0:
            raise DataError(f"request {i}: empty prompt (at least one token is needed)")
        if n > self.max_seq_len:
            raise DataError(f"request {i}: prompt of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise DataError(f"request {i}: token id {bad[0]} outside the model's vocabulary [0, {vocab})")

    def _run(self, requests: Sequence[GenerationRequest], offset: int) -> Iterator[list[TokenEvent]]:
        for i, req in enumerate(requests):
            self._check(req, offset + i)
        B = len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        P = max(lens)
        # Token k of a row is fed at position len + k; the last one is never fed.
        budgets = [
            min(r.params.max_tokens, self.max_seq_len - n + 1) for r, n in zip(requests, lens, strict=True)
        ]
        rows = [_Row(r, self.tokenizer, b, self.device) for r, b in zip(requests, budgets, strict=True)]
        cap = P + max(budgets) - 1
        window = self.cfg.sliding_window
        padded = min(lens) != P
        masked = padded or (window is not None and cap > window)
        dev = self.device
        with torch.inference_mode():
            ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=dev)
            for r, req in enumerate(requests):
                ids[r, P - lens[r] :] = torch.tensor(req.prompt_ids, dtype=torch.long, device=dev)
            cache = KVCache.empty(self.cfg, B, cap, device=dev, dtype=self.dtype)
            first_pos = torch.tensor([P - n for n in lens], device=dev)  # slot of each row's position 0
            pos = mask = key_pos = None
            if masked:
                slots = torch.arange(cap, device=dev)
                key_pos = slots[None, :] - first_pos[:, None]  # (B, cap); < 0 marks padding
                pos = key_pos[:, :P].clamp(min=0)  # (B, P)
                mask = self._mask(pos[:, :, None], key_pos[:, None, :P], window)  # (B, 1, P, P)
                mask |= torch.eye(P, dtype=torch.bool, device=dev)  # no query row fully masked (padding)
            seen = None
            if any(r.params.repetition_penalty != 1.0 for r in rows):
                seen = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=dev)
                for r, req in enumerate(requests):
                    seen[r, torch.tensor(req.prompt_ids, device=dev)] = True
            logits = self._forward(ids, pos, mask, cache)  # (B, vocab)
        step = 0
        while True:
            with torch.inference_mode():
                events = self._sample_step(rows, logits, seen, offset)
            yield events
            if all(row.done for row in rows):
                return
            with torch.inference_mode():
                feed = [row.out[-1] if not row.done and row.out else self.pad_id for row in rows]
                x = torch.tensor(feed, dtype=torch.long, device=dev)[:, None]  # (B, 1)
                slot = P + step
                if masked:
                    assert key_pos is not None
                    # (B, 1) = each row's position; a finished row is still fed (a pad) and may run past
                    # the context when it has a longer prompt than a row still going: clamp, it is ignored
                    q = key_pos[:, slot : slot + 1].clamp(max=self.max_seq_len - 1)
                    mask = self._mask(q[:, :, None], key_pos[:, None, : slot + 1], window)  # (B, 1, 1, S)
                    logits = self._forward(x, q, mask, cache)
                else:
                    logits = self._forward(x, None, None, cache)
            step += 1

    @staticmethod
    def _mask(qpos: Tensor, kpos: Tensor, window: int | None) -> Tensor:
        """Bool (B, 1, Tq, S), True = attend: real keys at or before the query, within the sliding window."""
        allowed = (kpos >= 0) & (kpos <= qpos)
        if window is not None:
            allowed &= kpos > qpos - window
        return allowed[:, None]

    def _sample_step(
        self, rows: list[_Row], logits: Tensor, seen: Tensor | None, offset: int
    ) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        plain_greedy = [
            i
            for i, row in enumerate(rows)
            if not row.done
            and row.params.greedy
            and row.params.repetition_penalty == 1
            and row.req.logits_hook is None
        ]
        greedy_ids = logits[plain_greedy].argmax(-1).tolist() if plain_greedy else []
        chosen = dict(zip(plain_greedy, greedy_ids, strict=True))
        for i, row in enumerate(rows):
            if row.done:
                continue
            if row.req.cancelled is not None and row.req.cancelled.is_set():
                row.done = True
                events.append(TokenEvent(offset + i, None, "", "cancelled"))
                continue
            tid = chosen.get(i)
            if tid is None:
                row_logits = logits[i]
                if row.req.logits_hook is not None:
                    prev = row.out[-1] if row.out else row.req.prompt_ids[-1]
                    row_logits = row.req.logits_hook(row_logits, prev)
                tid = sample(row_logits, row.params, row.generator, None if seen is None else seen[i])
            if tid in row.stop_ids:
                row.done = True
                events.append(TokenEvent(offset + i, None, row.detok.delta(final=True), "stop"))
                continue
            row.out.append(tid)
            if seen is not None:
                seen[i, tid] = True
            row.detok.push(tid)
            reason = None
            if row.detok.find_stop():
                reason = "stop"
            elif len(row.out) >= row.budget:
                reason = "length"
            row.done = reason is not None
            events.append(TokenEvent(offset + i, tid, row.detok.delta(final=row.done), reason))
        return events


__all__ = ["Completion", "Detokenizer", "Engine", "GenerationRequest", "TokenEvent"]
