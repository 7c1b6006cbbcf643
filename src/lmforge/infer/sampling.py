"""Sampling parameters and the pure function that turns one row's logits into the next token.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    gen = make_generator(params, device)
    token = sample(logits, params, gen, seen)    # logits: (vocab,), seen: (vocab,) bool of tokens so far

Order of the logit transforms (as in `transformers`): repetition penalty -> temperature -> top-k -> top-p ->
min-p -> draw. `temperature=0` is greedy (argmax after the repetition penalty). The draw uses the row's own
seeded `torch.Generator`, so a request's tokens depend only on its logits, its params and its seed, never on
the other requests of the batch. Every op is a tensor op over the vocabulary (no Python loop over tokens).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from lmforge.config import Section


class SamplingParams(Section):
    """How to pick tokens for one request (the server validates a request's JSON into this)."""

    max_tokens: int = Field(256, ge=1, description="most tokens to generate (the prompt not counted)")
    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0 = greedy (argmax)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus: smallest set with this probability mass")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens below min_p x the top token's probability")
    repetition_penalty: float = Field(
        1.0, gt=0, description="> 1 discourages tokens already in the prompt or output (CTRL/HF rule)"
    )
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in the output)")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end the generation")
    seed: int | None = Field(
        None, description="seed of this request's sampler (null = drawn from torch's RNG)"
    )
    ignore_eos: bool = Field(False, description="keep generating after the end-of-text token")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """The row's private RNG: seeded by `params.seed`, else by a draw from torch's global RNG (so
    `torch.manual_seed` still makes unseeded runs reproducible)."""
    seed = params.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019) as `transformers` does it: seen tokens' positive logits / p, negative x p."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p and min-p on (..., vocab) logits; removed tokens get -inf."""
    # Shift by the max before dividing: the softmax is unchanged, and a tiny temperature cannot overflow
    # fp32 into inf - inf = NaN (the top token goes to 0, the rest towards -inf). A temperature below fp32's
    # smallest normal (1e-320 is valid JSON) would round to 0 and give 0 / 0: divide by that smallest instead.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(
        params.temperature, torch.finfo(torch.float32).tiny
    )
    neg_inf = float("-inf")
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass of the tokens strictly before it already reaches top_p; keeps >= 1.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop_sorted[..., 0] = False  # a top_p that rounds to 0 in fp32 must still keep the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * params.min_p
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def sample(
    logits: Tensor, params: SamplingParams, generator: torch.Generator, seen: Tensor | None = None
) -> int:
    """The next token id for one row. logits: (vocab,); seen: (vocab,) bool, tokens of prompt + output."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["SamplingParams", "apply_repetition_penalty", "filter_logits", "make_generator", "sample"]
