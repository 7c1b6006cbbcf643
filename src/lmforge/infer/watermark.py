"""Keyed green-list watermark for sampled text (Kirchenbauer et al. 2023) and its z-test detector.

    wm = Watermark(key, gamma=0.25, delta=2.0)
    GenerationRequest(prompt_ids, params, logits_hook=wm)   # the engine adds delta to green logits
    d = wm.detect(tok.encode(text))                          # d.z, d.p_value, d.green_fraction, d.scored

At each step the previous token id selects a green list: token t is green after `prev` when
mix64(seed(prev) + t * PHI) < gamma * 2^64, with seed(prev) the first 8 bytes of HMAC-SHA256(key, prev)
and mix64 the splitmix64 finaliser (a bijection, so distinct tokens never tie). Membership of one token
costs one hash, so the detector needs only the tokenizer and the key, never the model or its vocabulary
size; a green list holds a gamma fraction of the vocabulary on average. Sampling adds `delta` to the green
logits before the usual transforms (repetition penalty, temperature, top-k/p, min-p).

Detection scores each distinct (previous, token) bigram of the text once (the paper's "ignore repeated
bigrams" variant, so a repeated phrase cannot inflate the count) and runs the one-proportion z-test
z = (green - gamma T) / sqrt(T gamma (1 - gamma)), with the p-value from the normal upper tail. Without the
key a text is green at rate gamma whatever produced it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from lmforge.config import ConfigPath, Section
from lmforge.errors import ConfigError

KEY_ENV = "LMFORGE_WATERMARK_KEY"
_PHI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads consecutive token ids apart
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SEED_CACHE = 65536  # previous-token seeds kept (an HMAC each otherwise)
_BIAS_CACHE_ELEMENTS = 1 << 24  # bias vectors kept for sampling: 64 MB of fp32 (all of a small vocabulary)


class WatermarkConfig(Section):
    """The `watermark` section of `lmforge generate` (the key itself is never in a config or a log)."""

    enabled: bool = Field(False, description="bias sampling towards the key's green list of each step")
    key_file: ConfigPath | None = Field(
        None, description=f"file holding the secret key (null = the {KEY_ENV} environment variable)"
    )
    gamma: float = Field(0.25, gt=0, lt=1, description="green fraction of the vocabulary at each step")
    delta: float = Field(
        2.0, ge=0, description="logit bias added to green tokens (higher = easier to detect)"
    )


def read_key(key_file: str | None, what: str = "watermark.key_file") -> bytes:
    """The secret key from `key_file` (surrounding whitespace stripped) or, without one, $LMFORGE_WATERMARK_KEY."""
    if key_file is not None:
        path = Path(key_file)
        try:
            key = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"{what}: cannot read {path} ({e.strerror or e})") from None
        if not key:
            raise ConfigError(f"{what}: {path} is empty (a watermark needs a non-empty secret key)")
        return key
    env = os.environ.get(KEY_ENV, "").strip()
    if not env:
        raise ConfigError(f"no watermark key: set {what} or the {KEY_ENV} environment variable")
    return env.encode("utf-8")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (numpy wraps the products mod 2^64, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Detection:
    z: float
    p_value: float
    green: int  # green tokens among the scored ones
    scored: int  # distinct (previous, token) bigrams scored
    green_fraction: float
    gamma: float

    def detected(self, z_threshold: float) -> bool:
        return self.scored > 0 and self.z >= z_threshold

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def z_test(green: int, scored: int, gamma: float) -> tuple[float, float]:
    """(z, one-sided p-value) of `green` successes in `scored` trials against rate gamma."""
    if scored == 0:
        return 0.0, 1.0
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    return z, 0.5 * math.erfc(z / math.sqrt(2))


class Watermark:
    """A key with its gamma and delta. Called as the engine's `logits_hook(logits, prev) -> logits`."""

    def __init__(self, key: bytes, gamma: float = 0.25, delta: float = 2.0) -> None:
        if not key:
            raise ValueError("the watermark key must not be empty")
        if not 0 < gamma < 1:
            raise ValueError("gamma must lie in (0, 1)")
        self._key = key
        self.gamma, self.delta = gamma, delta
        # The largest uint64 below gamma * 2^64: P(green) = gamma for a uniform hash.
        self._threshold = np.uint64(min(int(gamma * 2.0**64), 2**64 - 1))
        self._seeds: dict[int, np.uint64] = {}
        self._bias: dict[tuple[int, int, torch.device], Tensor] = {}

    @classmethod
    def from_config(cls, cfg: WatermarkConfig) -> Watermark:
        return cls(read_key(cfg.key_file), cfg.gamma, cfg.delta)

    def __repr__(self) -> str:  # never show the key
        return f"Watermark(gamma={self.gamma}, delta={self.delta})"

    def seed(self, prev: int) -> np.uint64:
        s = self._seeds.get(prev)
        if s is None:
            digest = hmac.new(self._key, int(prev).to_bytes(8, "little", signed=True), hashlib.sha256)
            s = np.uint64(int.from_bytes(digest.digest()[:8], "little"))
            if len(self._seeds) >= _SEED_CACHE:
                self._seeds.clear()
            self._seeds[prev] = s
        return s

    def green(self, prevs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Bool per pair: is tokens[i] on the green list that prevs[i] selects?"""
        seeds = np.array([self.seed(p) for p in prevs], dtype=np.uint64)
        toks = np.asarray(tokens, dtype=np.uint64)
        return _mix64(seeds + toks * _PHI) < self._threshold

    def green_mask(self, prev: int, vocab_size: int) -> np.ndarray:
        """(vocab_size,) bool: the green list after `prev`."""
        toks = np.arange(vocab_size, dtype=np.uint64)
        return _mix64(self.seed(prev) + toks * _PHI) < self._threshold

    def __call__(self, logits: Tensor, prev: int) -> Tensor:
        """logits (vocab,) -> float32 logits with delta added to the green tokens after `prev`."""
        vocab = logits.size(-1)
        bias = self._bias.get((prev, vocab, logits.device))
        if bias is None:
            mask = torch.from_numpy(self.green_mask(prev, vocab))
            bias = (mask.float() * self.delta).to(logits.device)
            if (len(self._bias) + 1) * vocab > _BIAS_CACHE_ELEMENTS:
                self._bias.clear()
            self._bias[(prev, vocab, logits.device)] = bias
        return logits.float() + bias

    def detect(self, ids: Sequence[int]) -> Detection:
        """The z-test on a token sequence; its first token has no previous one and is not scored."""
        pairs = list(dict.fromkeys(itertools.pairwise(ids)))  # distinct, in order
        green = int(self.green([p for p, _ in pairs], [t for _, t in pairs]).sum()) if pairs else 0
        z, p = z_test(green, len(pairs), self.gamma)
        return Detection(z, p, green, len(pairs), green / len(pairs) if pairs else 0.0, self.gamma)


__all__ = ["KEY_ENV", "Detection", "Watermark", "WatermarkConfig", "read_key", "z_test"]
