"""Inference engine: greedy parity with `transformers` generate (Llama GQA, GPT-2, Mistral sliding window),
batch vs single equality with left padding, sampling filters by hand, seeds, stop rules, streaming text,
cancellation, model loading from every folder layout, and the generate / chat commands."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infer_helpers import make_tokenizer, save_hf_model  # noqa: E402
from lmforge.errors import DataError  # noqa: E402
from lmforge.infer.engine import Detokenizer, Engine, GenerationRequest  # noqa: E402
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample  # noqa: E402
from lmforge.model.source import load_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["To be, or not to be", "KING", "Enter the ghost of Hamlet's father, armed", "O"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict[str, tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("infer")
    return {f: (save_hf_model(f, tok, root / f), root / f) for f in ("llama", "gpt2", "mistral")}


@pytest.fixture(scope="module")
def engine(models: dict[str, tuple[Any, Path]]) -> Engine:
    model, t = load_model(models["llama"][1])
    return Engine(model, t)


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_greedy_batch_equals_transformers_generate(
    family: str, models: dict[str, tuple[Any, Path]], tok: Tokenizer
) -> None:
    hf, path = models[family]
    model, t = load_model(path)
    engine = Engine(model, t, max_batch_size=4)
    params = SamplingParams(max_tokens=24, temperature=0)  # stops at EOS, as generate does
    reqs = [GenerationRequest(t.encode(p), params) for p in PROMPTS]
    batch = engine.generate(reqs)  # prompts of 1..10 tokens: left padding and per-row positions
    for p, c in zip(PROMPTS, batch, strict=True):
        ids = torch.tensor([t.encode(p)])
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
        if t.eos_id in ref:  # generate keeps the EOS; the engine ends the row before it
            ref = ref[: ref.index(t.eos_id)]
            assert c.finish_reason == "stop"
        else:
            assert c.finish_reason == "length" and len(ref) == 24
        assert c.token_ids == ref
        assert c.text == t.decode(ref) and c.prompt_tokens == ids.shape[1]
        assert engine.generate([GenerationRequest(t.encode(p), params)])[0].token_ids == c.token_ids


def test_rows_with_long_prompts_and_short_budgets_next_to_long_generations(
    models: dict[str, tuple[Any, Path]],
) -> None:
    """A finished row with a long prompt keeps being fed pads while a short-prompt row runs to the end of
    the context: its positions must not run past the context, and the long row's tokens are its own."""
    model, t = load_model(models["llama"][1])
    engine = Engine(model, t, max_batch_size=2)  # the model's own context: 128 positions
    short, long = t.encode("O")[:2], (t.encode(PROMPTS[2]) * 20)[:100]
    both = engine.generate([GenerationRequest(short, greedy(1000)), GenerationRequest(long, greedy(1))])
    assert [len(c.token_ids) for c in both] == [128 - len(short) + 1, 1]
    alone = engine.generate([GenerationRequest(short, greedy(1000))])[0]
    assert both[0].token_ids == alone.token_ids


def test_max_tokens_and_the_context_limit(engine: Engine, tok: Tokenizer) -> None:
    for n in (1, 2, 7):
        [c] = engine.generate([GenerationRequest(tok.encode("KING"), greedy(n))])
        assert len(c.token_ids) == n and c.finish_reason == "length"
    # max_seq_len 128: a 120-token prompt leaves room for exactly 9 new tokens (the last is never fed).
    prompt = (tok.encode("To be, or not to be, that is the question. ") * 20)[:120]
    [c] = engine.generate([GenerationRequest(prompt, greedy(50))])
    assert len(c.token_ids) == 128 - 120 + 1 and c.finish_reason == "length"
    with pytest.raises(DataError, match="exceeds max_seq_len 128"):
        engine.generate([GenerationRequest([5] * 129, greedy(1))])
    with pytest.raises(DataError, match="empty prompt"):
        engine.generate([GenerationRequest([], greedy(1))])
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        engine.generate([GenerationRequest([600], greedy(1))])


class _EosAs:
    """The tokenizer with another EOS id."""

    def __init__(self, tok: Tokenizer, eos_id: int) -> None:
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_stop_tokens_and_stop_strings(engine: Engine, tok: Tokenizer) -> None:
    ids = tok.encode("Enter the ghost")
    [free] = engine.generate([GenerationRequest(ids, greedy(30))])
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    [c] = engine.generate([GenerationRequest(ids, greedy(30, stop_token_ids=[stop_tok]))])
    assert c.token_ids == free.token_ids[:first] and c.finish_reason == "stop"
    # EOS: a tokenizer whose EOS is that same token stops there unless ignore_eos.
    eos_engine = Engine(engine.model, _EosAs(tok, stop_tok))
    eos_params = SamplingParams(max_tokens=30, temperature=0)
    [c] = eos_engine.generate([GenerationRequest(ids, eos_params)])
    assert c.token_ids == free.token_ids[:first] and c.finish_reason == "stop"
    [c] = eos_engine.generate([GenerationRequest(ids, eos_params.model_copy(update={"ignore_eos": True}))])
    assert c.token_ids == free.token_ids
    text = free.text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    events = list(engine.stream(GenerationRequest(ids, greedy(30, stop=["zzzz-never", stop]))))
    streamed = "".join(e.text for e in events)
    assert streamed == text[: text.find(stop)]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert all(stop not in e.text for e in events)


def test_streamed_text_is_whole_utf8_and_equals_decode(tok: Tokenizer) -> None:
    text = "héllo wörld — 日本語のテキスト 🎭 done"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # multi-byte characters span several byte-level tokens here
    d = Detokenizer(tok, tok.encode("KING"), stop=[])
    parts = []
    for i in ids:
        d.push(i)
        parts.append(d.delta())
    parts.append(d.delta(final=True))
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)
    assert sum(1 for p in parts if p == "") >= 5  # held back while a character was incomplete


def test_sampling_filters_by_hand() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def kept(**kw: Any) -> list[int]:
        return torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.7) == [0, 1]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert kept(top_p=0.85) == [0, 1, 2]
    assert kept(top_p=0.1) == [0]
    assert kept(min_p=0.5) == [0, 1]  # >= 0.25
    assert kept(min_p=0.2) == [0, 1, 2]
    t = filter_logits(logits, SamplingParams(temperature=0.5)).softmax(-1)
    torch.testing.assert_close(t, torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)
    pen = apply_repetition_penalty(torch.tensor([2.0, -2.0, 2.0]), torch.tensor([True, True, False]), 2.0)
    assert pen.tolist() == [1.0, -4.0, 2.0]
    # Empirical frequencies of 4000 seeded draws at top_p=0.85 follow the renormalised 0.5/0.3/0.15.
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(top_p=0.85)
    counts = torch.bincount(torch.tensor([sample(logits, params, gen) for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.025, rtol=0)
    # top_k=1 is greedy whatever the temperature.
    assert sample(logits.flip(0), SamplingParams(top_k=1, temperature=5.0), gen) == 3


def test_seeds_reproduce_and_ignore_the_batch(engine: Engine, tok: Tokenizer) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    req = GenerationRequest(tok.encode("KING"), params)
    [a] = engine.generate([req])
    [b] = engine.generate([req])
    others = [GenerationRequest(tok.encode(p), params.model_copy(update={"seed": 1})) for p in PROMPTS]
    c = engine.generate([others[0], req, others[2]])[1]
    d = engine.generate([GenerationRequest(tok.encode("KING"), params.model_copy(update={"seed": 8}))])[0]
    assert a.token_ids == b.token_ids == c.token_ids
    assert a.token_ids != d.token_ids
    rep = params.model_copy(update={"repetition_penalty": 50.0, "max_tokens": 30})
    [r] = engine.generate([GenerationRequest(tok.encode("KING"), rep)])
    assert len(set(r.token_ids)) >= 27  # a huge penalty all but forbids repeats (prompt tokens included)


def test_cancel_stops_a_row_at_the_next_step(engine: Engine, tok: Tokenizer) -> None:
    flag = threading.Event()
    reqs = [
        GenerationRequest(tok.encode("KING"), greedy(20), cancelled=flag),
        GenerationRequest(tok.encode("O"), greedy(20)),
    ]
    steps = []
    for events in engine.stream_batch(reqs):
        steps.append(events)
        if len(steps) == 3:
            flag.set()
    row0 = [e for s in steps for e in s if e.index == 0]
    assert [e.token_id is not None for e in row0] == [True, True, True, False]
    assert row0[-1].finish_reason == "cancelled"
    assert len([e for s in steps for e in s if e.index == 1]) == 20 and len(steps) == 20


def test_batches_above_max_batch_size_run_in_chunks(
    models: dict[str, tuple[Any, Path]], tok: Tokenizer
) -> None:
    model, t = load_model(models["gpt2"][1])
    small = Engine(model, t, max_batch_size=2)
    reqs = [GenerationRequest(t.encode(p), greedy(6)) for p in PROMPTS]
    assert [c.token_ids for c in small.generate(reqs)] == [
        c.token_ids for c in Engine(model, t).generate(reqs)
    ]


def _fake_run(root: Path, models: dict[str, tuple[Any, Path]], tok: Tokenizer) -> tuple[Path, Any]:
    """A pretraining run's layout around the llama weights: model/, checkpoints/step-N/, config.yaml."""
    from safetensors.torch import save_file

    model, _ = load_model(models["llama"][1])
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    run = root / "run"
    (run / "model").mkdir(parents=True)
    save_file(sd, str(run / "model" / "model.safetensors"))
    (run / "model" / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")))
    ck = run / "checkpoints" / "step-000010"
    ck.mkdir(parents=True)
    save_file({"_orig_mod." + k: v for k, v in sd.items()}, str(ck / "model.safetensors"))
    (ck / "state.json").write_text('{"step": 10}')
    tok.save(root / "tokens" / "tokenizer")
    (run / "config.yaml").write_text(f"command: pretrain\ndata: {root / 'tokens'}\noutput: {run}\n")
    return run, model


def test_load_model_from_every_layout(
    tmp_path: Path, models: dict[str, tuple[Any, Path]], tok: Tokenizer
) -> None:
    run, ref = _fake_run(tmp_path, models, tok)
    ids = torch.tensor([tok.encode("To be, or not")])
    expected = ref(ids)
    for path in (run, run / "model", run / "checkpoints" / "step-000010"):
        model, t = load_model(path)
        torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
        assert t.encode("To be") == tok.encode("To be")  # found via config.yaml's data/tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a model folder; expected an HF model folder"):
        load_model(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((models["llama"][1] / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(DataError, match="pickle"):
        load_model(pickled)


def test_generate_command(
    tmp_path: Path, models: dict[str, tuple[Any, Path]], tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.cli import main
    from lmforge.infer.generate import GenerateConfig, run

    pf = tmp_path / "prompts.txt"
    pf.write_text("KING\nTo be, or not\\nto be\n\n")
    out = tmp_path / "out.jsonl"
    path = models["llama"][1]
    cfg = GenerateConfig(model=str(path), prompt_file=str(pf), output=str(out), sampling=greedy(5))
    buf = io.StringIO()
    results = run(cfg, out=buf)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["KING", "To be, or not\nto be"]
    engine = Engine(*load_model(path))
    for r in rows:
        [c] = engine.generate([GenerationRequest(tok.encode(r["prompt"]), greedy(5))])
        assert r["text"] == c.text and r["completion_tokens"] == 5 and r["finish_reason"] == "length"
    assert results == rows and "--- [1]" in buf.getvalue()
    assert main(["generate", f"model={tmp_path / 'nope'}", "prompt=x"]) == 2
    assert main(["generate", f"model={path}"]) == 2  # no prompts
    seen: list[list[int]] = []
    real = Engine.generate

    def spy(self: Engine, reqs: Any, *a: Any, **kw: Any) -> Any:
        seen.extend(list(r.params.stop_token_ids) for r in reqs)
        return real(self, reqs, *a, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    run(GenerateConfig(model=str(path), prompts=["hi", "there"], chat=True, sampling=greedy(3)))
    end = tok.special_tokens["<|im_end|>"]
    assert len(seen) == 2 and all(end in ids for ids in seen)  # a chat reply stops at the turn end
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"prompt_file: .*latin1.txt is not UTF-8"):
        run(GenerateConfig(model=str(path), prompt_file=str(latin)))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        run(GenerateConfig(model=str(path), prompt_file=str(bad_jsonl)))


def test_chat_session_uses_the_template_and_keeps_history(models: dict[str, tuple[Any, Path]]) -> None:
    from lmforge.infer.chat import ChatSession, loop

    model, t = load_model(models["llama"][1])
    engine = Engine(model, t)
    session = ChatSession(engine, t, "Be brief.", greedy(6))
    assert t.special_tokens["<|im_end|>"] in session.params.stop_token_ids
    out = io.StringIO()
    assert loop(session, io.StringIO("Hello\n\nWho are you?\n/reset\nAgain\n"), out) == 0
    assert [m["role"] for m in session.messages] == [
        "user",
        "assistant",
    ]  # /reset dropped the first two turns
    expected_prompt = t.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again"}],
        add_generation_prompt=True,
    )
    [c] = engine.generate([GenerationRequest(t.encode(expected_prompt), session.params)])
    assert session.messages[1]["content"] == c.text
    assert "(conversation reset)" in out.getvalue()


def test_fused_projections_share_the_weights(models: dict[str, tuple[Any, Path]], tok: Tokenizer) -> None:
    model, t = load_model(models["llama"][1])
    ids = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        before = model(ids)
    Engine(model, t)
    attn: Any = model.layers[0].attn
    assert attn.fused is not None
    qkv = attn.fused.weight
    assert attn.q.weight.data_ptr() == qkv.data_ptr()  # a view into the merged tensor, not a copy
    assert attn.k.weight.data_ptr() == qkv.data_ptr() + attn.q.weight.numel() * qkv.element_size()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        attn.k.weight.add_(1.0)  # writes through to what the engine multiplies by
    assert torch.equal(
        qkv[attn.q.weight.shape[0] : attn.q.weight.shape[0] + attn.k.weight.shape[0]], attn.k.weight
    )


@pytest.mark.slow
def test_compiled_engine_matches_eager(models: dict[str, tuple[Any, Path]], tok: Tokenizer) -> None:
    """compile=True (dynamic shapes): same logits as eager to float tolerance, for padded and plain batches."""
    model, t = load_model(models["llama"][1])
    eager, compiled = Engine(model, t), Engine(model, t, compile=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        reqs = [GenerationRequest(t.encode(p), greedy(12)) for p in prompts]
        a, b = eager.generate(reqs), compiled.generate(reqs)
        same_rows = sum(ca.token_ids == cb.token_ids for ca, cb in zip(a, b, strict=True))
        assert same_rows >= (len(reqs) + 1) // 2  # a near-tie argmax may flip a row; most must not
    from lmforge.model.transformer import KVCache

    ids = torch.tensor([t.encode(PROMPTS[2])])
    outs = []
    for eng in (eager, compiled):
        cache = KVCache.empty(model.cfg, 1, 64)
        with torch.inference_mode():
            outs.append(
                torch.stack(
                    [eng._forward(ids, None, None, cache), eng._forward(ids[:, :1], None, None, cache)]
                )
            )
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_extreme_sampling_params_give_a_token_not_nan() -> None:
    """A top_p that is 0 in fp32 and a temperature that overflows fp32 both still pick the top token."""
    import torch

    from lmforge.infer.sampling import SamplingParams, make_generator, sample

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for params in (SamplingParams(top_p=1e-320, seed=0), SamplingParams(temperature=1e-40, seed=0)):
        assert sample(logits, params, make_generator(params)) == 1
