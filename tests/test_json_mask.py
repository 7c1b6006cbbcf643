"""JSON-object constrained decoding (infer/json_mask.py): the grammar against Python's json module on
random documents and random byte strings, its closing strings, and random sampling from a random model
whose every answer must parse as a JSON object whatever max_tokens is."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.json_mask import START, JsonObjectMask, JsonVocab, closing_text, run
from lmforge.infer.sampling import SamplingParams
from serve_helpers import tiny_model


def _value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**6), 10**6)
    if kind == 2:
        return rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-30, 30)
    if kind in (3, 4):
        return "".join(rng.choice('ab"\\\n\t\u00e9\u4e2d/ \x01') for _ in range(rng.randrange(6)))
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randrange(4))}


def _strict(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=no_constant)


def test_every_prefix_of_a_valid_object_is_accepted_and_closes() -> None:
    rng = random.Random(0)
    for i in range(300):
        obj = {f"k{j}": _value(rng, 1) for j in range(rng.randrange(4))}
        text = json.dumps(obj, ensure_ascii=bool(i % 2), indent=None if i % 3 else 2)
        data = (" " if i % 5 == 0 else "") + text
        raw = data.encode("utf-8")
        assert run(START, raw) == ("done", "", None), text
        for cut in range(len(raw)):
            state = run(START, raw[:cut])
            assert state is not None, raw[:cut]
            head = raw[:cut].decode("utf-8", errors="ignore")
            if len(head.encode()) == cut:  # a cut inside a UTF-8 character cannot be decoded alone
                assert isinstance(_strict(head + closing_text(state)), dict), head


def test_random_strings_accepted_iff_they_are_json_objects() -> None:
    rng = random.Random(1)
    alphabet = '{}[]":,-+.0123456789eEtrufalsn \\/bu"x'
    accepted = parsed = 0
    for _ in range(20000):
        s = "{" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        try:
            ok = isinstance(_strict(s), dict) and s == s.rstrip()
        except ValueError:
            ok = False
        state = run(START, s.encode())
        assert (state == ("done", "", None)) == ok, s
        accepted += state is not None
        parsed += ok
    assert parsed >= 40 and accepted > 10 * parsed  # both outcomes were exercised


@pytest.mark.parametrize("max_tokens", [2, 5, 32])
def test_sampled_answers_of_a_random_model_are_json_objects(max_tokens: int) -> None:
    model, tok = tiny_model()
    vocab = JsonVocab.of(tok, model.cfg.vocab_size)
    assert vocab.supported
    engine = Engine(model, tok, max_batch_size=8)
    reqs = []
    for seed in range(8):
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        hook = JsonObjectMask(vocab, max_tokens, {tok.eos_id})
        reqs.append(GenerationRequest(tok.encode("KING:"), params, logits_hook=hook))
    outs = engine.generate(reqs)
    for out in outs:
        assert len(out.token_ids) <= max_tokens
        assert isinstance(_strict(out.text), dict), out.text
    if max_tokens >= 32:  # room to say something: not every answer is the empty object
        assert sum(out.text.strip() != "{}" for out in outs) >= 4
