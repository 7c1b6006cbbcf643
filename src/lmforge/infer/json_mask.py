"""Constrained decoding to a JSON object: a logits hook that masks every token which would make the output
anything but a prefix of a JSON object, and that closes the object within the row's max_tokens.

    vocab = JsonVocab.of(tokenizer, model_vocab_size)   # once per tokenizer (token bytes, cached masks)
    hook = JsonObjectMask(vocab, budget=max_tokens, stop_ids={tokenizer.eos_id})
    GenerationRequest(prompt_ids, params, logits_hook=hook)   # one hook per row: it holds the row's state

The grammar is RFC 8259 restricted to an object at the top level, run byte by byte as a small pushdown
automaton (`step`): a state is (mode, open containers, extra). For each state reached, every token's bytes
are run through it once and the result cached: which tokens keep the output a valid prefix, and how many
more tokens the shortest completion would then need (`closing`: one per character of e.g. `":0}]`, since
each of those characters is a token of its own in a byte-level vocabulary). A token is allowed when the
prefix stays valid and its closing still fits in the tokens left, so the row can always finish: with two
tokens left inside a string, only `"` or `"}`-like tokens remain. When the object is closed only the stop
tokens (EOS) are allowed. Special tokens never appear inside the JSON.

The output is valid JSON whatever the model's logits (tests/test_json_mask.py samples a random model).
It is the grammar, not the model, that makes it JSON: a model that was never trained on JSON produces
valid but meaningless objects. Cost: the first visit to a state runs the vocabulary's bytes through it in
Python (a few ms for 512 tokens; 0.05-0.2 s for 32k on a loaded CPU, less inside a string, where tokens
without a quote, backslash or control byte are not run); later visits reuse the cached mask.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import Tensor

MAX_DEPTH = 32  # nesting beyond this is refused (a bound on the closing string, and on the state space)
CACHED_STATES = 512  # masks kept per vocabulary (LRU)
_INVALID = 1 << 30
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# Characters the closing strings use, each of which must be one token (checked by JsonVocab.supported).
_CLOSING_CHARS = b'{}[]":0nrueals'
_NUMBER_END = {"n0", "ni", "nf", "nd"}  # number modes where the number may end
_WS_MODES = {"start", "val", "val]", "key}", "key", "colon", "after"}

State = tuple[str, str, Any]  # (mode, stack of 'o'/'a' for open objects/arrays, extra)
START: State = ("start", "", None)


def _value_done(stack: str) -> State:
    return ("after", stack, None) if stack else ("done", "", None)


def _close(stack: str, c: int) -> State | None:
    if not stack or stack[-1] != ("o" if c == ord("}") else "a"):
        return None
    return _value_done(stack[:-1])


def _value_start(stack: str, c: int) -> State | None:
    if c == ord("{") or c == ord("["):
        if len(stack) >= MAX_DEPTH:
            return None
        return ("key}", stack + "o", None) if c == ord("{") else ("val]", stack + "a", None)
    if c == ord('"'):
        return ("s", stack, None)
    if c == ord("-"):
        return ("n-", stack, None)
    if c == ord("0"):
        return ("n0", stack, None)
    if c in _DIGITS:
        return ("ni", stack, None)
    if c in _LITERALS:
        return ("lit", stack, _LITERALS[c])
    return None


_NUMBER = {  # mode -> {byte class -> next mode}
    "n-": {"0": "n0", "d": "ni"},
    "n0": {".": "n.", "e": "ne"},
    "ni": {"0": "ni", "d": "ni", ".": "n.", "e": "ne"},
    "n.": {"0": "nf", "d": "nf"},
    "nf": {"0": "nf", "d": "nf", "e": "ne"},
    "ne": {"0": "nd", "d": "nd", "+": "nes"},
    "nes": {"0": "nd", "d": "nd"},
    "nd": {"0": "nd", "d": "nd"},
}


def _number_class(c: int) -> str:
    if c == ord("0"):
        return "0"
    if c in _DIGITS:
        return "d"
    if c in (ord("e"), ord("E")):
        return "e"
    if c in (ord("+"), ord("-")):
        return "+"
    return "." if c == ord(".") else ""


def step(state: State, c: int) -> State | None:
    """The state after byte `c`, or None if the output would stop being a prefix of a JSON object."""
    mode, stack, extra = state
    if mode in ("s", "k"):
        if c == ord('"'):
            return ("colon", stack, None) if mode == "k" else _value_done(stack)
        if c == ord("\\"):
            return (mode + "e", stack, None)
        return None if c < 0x20 else state
    if mode in ("se", "ke"):
        if c in _ESCAPES:
            return (mode[0], stack, None)
        return (mode[0] + "u", stack, 4) if c == ord("u") else None
    if mode in ("su", "ku"):
        if c not in _HEX:
            return None
        return (mode[0], stack, None) if extra == 1 else (mode, stack, extra - 1)
    if mode in _NUMBER:
        nxt = _NUMBER[mode].get(_number_class(c))
        if nxt is not None:
            return (nxt, stack, None)
        if mode not in _NUMBER_END:
            return None
        return step(_value_done(stack), c)  # the number ended: this byte belongs to what follows
    if mode == "lit":
        if c != extra[0]:
            return None
        return _value_done(stack) if len(extra) == 1 else ("lit", stack, extra[1:])
    if c in _WS and mode in _WS_MODES:
        return state
    if mode == "start":
        return ("key}", "o", None) if c == ord("{") else None
    if mode in ("val", "val]"):
        if mode == "val]" and c == ord("]"):
            return _close(stack, c)
        return _value_start(stack, c)
    if mode in ("key}", "key"):
        if c == ord('"'):
            return ("k", stack, None)
        return _close(stack, c) if mode == "key}" and c == ord("}") else None
    if mode == "colon":
        return ("val", stack, None) if c == ord(":") else None
    if mode == "after":
        if c == ord(","):
            return ("key" if stack[-1] == "o" else "val", stack, None)
        return _close(stack, c) if c in (ord("}"), ord("]")) else None
    return None  # done: nothing may follow the object


def closing_text(state: State) -> str:
    """The shortest text that completes the object from `state` (e.g. `":0}` inside a key)."""
    mode, stack, extra = state
    closers = "".join("}" if c == "o" else "]" for c in reversed(stack))
    if mode in ("su", "ku"):
        return "0" * extra + ('"' if mode == "su" else '":0') + closers
    if mode == "lit":
        return extra.decode("ascii") + closers
    return _MODE_CLOSING.get(mode, "") + closers


_MODE_CLOSING = {
    "start": "{}",
    "val": "0",
    "key": '"":0',
    "colon": ":0",
    "s": '"',
    "k": '":0',
    "se": 'n"',
    "ke": 'n":0',
    "n-": "0",
    "n.": "0",
    "ne": "0",
    "nes": "0",
}


def closing(state: State) -> int:
    """Tokens the shortest completion needs: one per character of `closing_text` (single-byte tokens)."""
    return len(closing_text(state))


def run(state: State | None, data: bytes) -> State | None:
    for c in data:
        if state is None:
            return None
        state = step(state, c)
    return state


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level vocabulary uses for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes | None]:
    """Each token id's bytes as it appears in decoded text; None for special tokens and ids past the
    tokenizer (a model's padded vocabulary). Byte-level vocabularies map exactly; others are decoded one
    token at a time, a token that is part of a UTF-8 character standing as b"\\x80" (string content)."""
    backend = tokenizer.backend
    special = set(getattr(tokenizer, "_special_ids", set())) | set(tokenizer.special_tokens.values())
    out: list[bytes | None] = [None] * vocab_size
    decoder = (json.loads(backend.to_str()).get("decoder") or {}).get("type")
    table = _bytes_to_unicode() if decoder == "ByteLevel" else None
    for piece, tid in backend.get_vocab(with_added_tokens=True).items():
        if not 0 <= tid < vocab_size or tid in special:
            continue
        if table is not None and all(ch in table for ch in piece):
            out[tid] = bytes(table[ch] for ch in piece)
        else:
            text = backend.decode([tid])
            out[tid] = b"\x80" if "\ufffd" in text else text.encode("utf-8")
    return out


class JsonVocab:
    """A vocabulary's token bytes and the cached per-state tables of closing costs (shared by rows)."""

    _cache: ClassVar[dict[tuple[int, int], JsonVocab]] = {}

    def __init__(self, pieces: list[bytes | None]) -> None:
        self.pieces = pieces
        self.size = len(pieces)
        singles = {p[0] for p in pieces if p is not None and len(p) == 1}
        self.supported = all(c in singles for c in _CLOSING_CHARS)
        # Tokens that leave a string state as it is (no quote, backslash or control byte): most of them,
        # and strings are where long answers spend their tokens, so those states skip the per-byte run.
        self.plain = [p is not None and all(c >= 0x20 and c not in (0x22, 0x5C) for c in p) for p in pieces]
        self._tables: OrderedDict[State, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> JsonVocab:
        key = (id(tokenizer), vocab_size)
        if key not in cls._cache:
            cls._cache[key] = cls(token_bytes(tokenizer, vocab_size))
        return cls._cache[key]

    def table(self, state: State) -> Tensor:
        """(vocab,) int32: the closing cost after each token from `state`, or a huge number if invalid."""
        with self._lock:
            got = self._tables.get(state)
            if got is not None:
                self._tables.move_to_end(state)
                return got
        costs = [_INVALID] * self.size
        in_string = state[0] in ("s", "k")
        same = closing(state)
        for tid, piece in enumerate(self.pieces):
            if in_string and self.plain[tid]:
                costs[tid] = same
            elif piece:
                after = run(state, piece)
                if after is not None:
                    costs[tid] = closing(after)
        got = torch.tensor(costs, dtype=torch.int32)
        with self._lock:
            self._tables[state] = got
            while len(self._tables) > CACHED_STATES:
                self._tables.popitem(last=False)
        return got


class JsonObjectMask:
    """The logits hook of one row (`GenerationRequest.logits_hook`): see the module docstring. Called once
    per step with the row's logits and the token chosen at the step before."""

    def __init__(self, vocab: JsonVocab, budget: int, stop_ids: set[int], inner: Any = None) -> None:
        if budget < closing(START):
            raise ValueError(f"a JSON object needs at least {closing(START)} tokens")
        self.vocab, self.budget, self.inner = vocab, budget, inner
        self.stop_ids = sorted(i for i in stop_ids if 0 <= i < vocab.size)
        self.state: State | None = START
        self.calls = 0

    def __call__(self, logits: Tensor, prev: int) -> Tensor:
        if self.inner is not None:  # e.g. the watermark's bias, before the grammar's mask
            logits = self.inner(logits, prev)
        if self.calls > 0:  # `prev` is the token this row chose last step
            piece = self.vocab.pieces[prev] if 0 <= prev < self.vocab.size else None
            self.state = run(self.state, piece) if piece else None
        left = self.budget - self.calls  # tokens this row may still produce, this one included
        self.calls += 1
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        if self.state is not None and self.state[0] != "done":
            ok = self.vocab.table(self.state) <= left - 1
            allowed[: self.vocab.size] = ok.to(logits.device)
        if not bool(allowed.any()):  # the object is complete (or, never, a dead end): end the row
            allowed[self.stop_ids] = True
        return logits.masked_fill(~allowed, float("-inf"))


__all__ = ["START", "JsonObjectMask", "JsonVocab", "closing", "closing_text", "run", "step", "token_bytes"]
