"""Watermarked generation (infer/watermark.py): the z-test's numbers, green lists of a gamma fraction, the
engine hook (off = bit-identical output), detection rate and false positives on 200 texts of 200 tokens
from a random tiny model, a wrong key detecting nothing, and the generate / watermark detect commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import llama_cfg, save_model_dir
from infer_helpers import make_tokenizer
from lmforge.cli import main
from lmforge.infer.engine import Completion, Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.watermark import KEY_ENV, Watermark, z_test
from lmforge.infer.watermark_detect import split_argv
from lmforge.model.source import load_model
from lmforge.model.transformer import build_model
from lmforge.tokenizer import Tokenizer

KEY = b"test-watermark-key-0123"
N_TEXTS, N_TOKENS = 200, 200


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    # init_std 0.02: near-uniform next-token distributions, the high-entropy text a watermark marks easily
    model = build_model(llama_cfg(max_seq_len=256, init_std=0.02), seed=1).eval()
    return save_model_dir(model, tok, tmp_path_factory.mktemp("wm") / "model")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    model, t = load_model(model_dir)
    return Engine(model, t, max_batch_size=N_TEXTS)


def generate(engine: Engine, hook: Watermark | None, n: int = N_TEXTS, **kw: object) -> list[Completion]:
    params = {"max_tokens": N_TOKENS, "temperature": 1.0, "ignore_eos": True} | kw
    reqs = [
        GenerationRequest([(7 * i + 3) % 500 + 5], SamplingParams(**params, seed=i), logits_hook=hook)  # type: ignore[arg-type]
        for i in range(n)
    ]
    return engine.generate(reqs)


def test_z_test_numbers() -> None:
    z, p = z_test(50, 100, 0.25)  # (50 - 25) / sqrt(100 * 0.25 * 0.75)
    assert z == pytest.approx(25 / math.sqrt(18.75)) and z == pytest.approx(5.7735, abs=1e-4)
    assert p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2))) and 3e-9 < p < 5e-9
    assert z_test(25, 100, 0.25) == (0.0, 0.5)
    assert z_test(0, 0, 0.25) == (0.0, 1.0)
    z, p = z_test(10, 100, 0.25)
    assert z == pytest.approx(-15 / math.sqrt(18.75)) and p > 0.99


def test_green_lists_hold_a_gamma_fraction_and_depend_on_key_and_previous_token() -> None:
    wm = Watermark(KEY, gamma=0.25)
    mask = wm.green_mask(17, 50_000)
    assert abs(mask.mean() - 0.25) < 0.01
    assert np.array_equal(wm.green([17] * 50_000, list(range(50_000))), mask)  # the detector's path agrees
    other_prev, other_key = wm.green_mask(18, 50_000), Watermark(b"another key").green_mask(17, 50_000)
    for m in (other_prev, other_key):  # independent lists overlap on gamma^2 of the vocabulary
        assert abs((mask & m).mean() - 0.0625) < 0.01
    assert abs(Watermark(KEY, gamma=0.5).green_mask(17, 50_000).mean() - 0.5) < 0.01
    assert "test-watermark" not in repr(wm)


def test_hook_adds_delta_to_green_logits_only() -> None:
    wm = Watermark(KEY, gamma=0.25, delta=2.0)
    logits = torch.randn(512, dtype=torch.bfloat16)
    out = wm(logits, 3)
    mask = torch.from_numpy(wm.green_mask(3, 512))
    assert out.dtype == torch.float32
    assert torch.equal(out[mask], logits.float()[mask] + 2.0)
    assert torch.equal(out[~mask], logits.float()[~mask])


def test_detect_scores_each_distinct_bigram_once() -> None:
    wm = Watermark(KEY)
    d = wm.detect([5, 6] * 50)  # 99 bigrams, 2 distinct: (5, 6) and (6, 5)
    assert d.scored == 2 and d.green == int(wm.green([5, 6], [6, 5]).sum())
    assert wm.detect([5]).scored == 0 and wm.detect([5]).p_value == 1.0


def test_detection_rate_and_false_positive_rate(engine: Engine, tok: Tokenizer) -> None:
    """200 texts of 200 tokens: detected at p < 0.01 >= 95%, plain / wrong-key false positives <= 1%.
    Scored on the re-tokenized text, as `lmforge watermark detect` sees it."""
    wm, wrong = Watermark(KEY, 0.25, 2.0), Watermark(b"not the key", 0.25)
    marked, plain = generate(engine, wm), generate(engine, None)
    assert all(len(c.token_ids) == N_TOKENS for c in marked + plain)
    on_marked = [wm.detect(tok.encode(c.text)) for c in marked]
    on_plain = [wm.detect(tok.encode(c.text)) for c in plain]
    wrong_key = [wrong.detect(tok.encode(c.text)) for c in marked]

    def rate(ds: list, p: float) -> float:  # type: ignore[type-arg]
        return sum(d.p_value < p for d in ds) / len(ds)

    # At the command's verdict threshold (z >= 4, p < 3.2e-5, so also p < 0.01): all 200 detected, and no
    # plain or wrong-key text is a false positive (the requirement: >= 0.95 and <= 0.01).
    assert sum(d.detected(4.0) for d in on_marked) / N_TEXTS == 1.0
    assert sum(d.detected(4.0) for d in on_plain + wrong_key) == 0
    assert rate(on_marked, 0.01) == 1.0 and rate(on_marked, 1e-6) >= 0.95
    # Thresholded at p < 0.01 itself a valid test flags ~1% of unmarked texts by construction (binomial sd
    # 0.7% over 200): within 3 sd of 0.01, not the 71% green rate of the marked texts.
    assert rate(on_plain, 0.01) <= 0.031 and rate(wrong_key, 0.01) <= 0.031
    # Near-uniform sampling: green rate gamma e^delta / (gamma e^delta + 1 - gamma) = 0.711 on the ids.
    expected = 0.25 * math.e**2 / (0.25 * math.e**2 + 0.75)
    assert abs(np.mean([wm.detect(c.token_ids).green_fraction for c in marked]) - expected) < 0.02
    assert abs(np.mean([d.green_fraction for d in on_plain]) - 0.25) < 0.02
    assert abs(np.mean([d.green_fraction for d in wrong_key]) - 0.25) < 0.02


def test_watermark_off_is_bit_identical(engine: Engine) -> None:
    """No hook runs the unchanged path; delta = 0 goes through the hook and must give the same tokens."""
    zero = Watermark(KEY, delta=0.0)
    for kw in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 50}, {"top_p": 0.9}):
        off = [c.token_ids for c in generate(engine, None, n=4, max_tokens=40, **kw)]
        assert [c.token_ids for c in generate(engine, zero, n=4, max_tokens=40, **kw)] == off
        assert [c.token_ids for c in generate(engine, None, n=4, max_tokens=40, **kw)] == off
    greedy_marked = generate(engine, Watermark(KEY, delta=4.0), n=4, max_tokens=40, temperature=0.0)
    greedy_off = generate(engine, None, n=4, max_tokens=40, temperature=0.0)
    assert [c.token_ids for c in greedy_marked] != [c.token_ids for c in greedy_off]  # greedy is marked too


# -- the commands --------------------------------------------------------------------------------------
def test_generate_then_detect_cli(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    prompts = json.dumps(["KING:", "To be", "O", "Enter"])
    common = [f"model={model_dir}", f"prompts={prompts}", "sampling.max_tokens=120", "sampling.seed=3"]
    marked, plain = tmp_path / "marked.jsonl", tmp_path / "plain.jsonl"
    assert main(["generate", *common, "watermark.enabled=true", f"output={marked}"]) == 0
    assert main(["generate", *common, f"output={plain}"]) == 0
    out = capsys.readouterr()
    assert KEY.decode() not in out.out + out.err  # the key is never printed

    assert main(["watermark", "detect", str(marked), f"model={model_dir}", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(r["verdict"] == "watermarked" and r["p_value"] < 1e-4 for r in rows)
    assert all(r["scored"] > 60 and r["gamma"] == 0.25 for r in rows)
    assert main(["watermark", "detect", str(plain), f"model={model_dir}", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["verdict"] == "not watermarked" for r in rows)

    wrong = tmp_path / "wrong.key"
    wrong.write_text("some other key\n")
    assert main(["watermark", "detect", str(marked), f"tokenizer={model_dir}", f"key_file={wrong}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(": not watermarked (z=" in line for line in lines)

    text = json.loads(marked.read_text().splitlines()[0])["text"]
    assert main(["watermark", "detect", text, f"model={model_dir}"]) == 0
    assert capsys.readouterr().out.startswith("text: watermarked (z=")


def test_generate_without_watermark_matches_the_engine(
    model_dir: Path, engine: Engine, tmp_path: Path, tok: Tokenizer
) -> None:
    out = tmp_path / "o.jsonl"
    args = ["generate", f"model={model_dir}", 'prompts=["KING:", "O"]', "sampling.max_tokens=30"]
    assert main([*args, "sampling.seed=5", "watermark.enabled=false", f"output={out}"]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    params = SamplingParams(max_tokens=30, seed=5)
    ref = engine.generate([GenerationRequest(tok.encode(p), params) for p in ("KING:", "O")])
    assert texts == [c.text for c in ref]


def test_user_errors_are_one_line(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["generate", f"model={model_dir}", "prompt=O", "watermark.enabled=true"]) == 2
    assert KEY_ENV in capsys.readouterr().err
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert main(["watermark", "detect", "hello", f"model={model_dir}", f"key_file={empty}"]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(KEY_ENV, "k")
    assert main(["watermark", "detect", "hello"]) == 2
    assert "model=" in capsys.readouterr().err
    assert main(["watermark", "detect", f"model={model_dir}"]) == 2
    assert "TEXT_OR_FILE" in capsys.readouterr().err
    assert main(["watermark", "detect", "x", f"model={model_dir}", "gamma=1.5"]) == 2


def test_split_argv() -> None:
    assert split_argv(["some text", "model=m", "--json"]) == ("some text", True, ["model=m"])
    assert split_argv(["-c", "cfg.yaml", "f.jsonl"]) == ("f.jsonl", False, ["-c", "cfg.yaml"])
    assert split_argv(["input=a=b"]) == (None, False, ["input=a=b"])


def test_served_answers_are_watermarked(model_dir: Path, tmp_path: Path) -> None:
    """`lmforge serve watermark.enabled=true`: the answers of the real server, read through the openai client and
    re-tokenized as `watermark detect` does, are all detected at z >= 4; the same server without it, none."""
    from openai import OpenAI

    from lmforge.serve.app import create_app
    from lmforge.serve.state import ServeConfig
    from serve_helpers import BackgroundServer

    key_file = tmp_path / "wm.key"
    key_file.write_bytes(KEY)
    model, t = load_model(model_dir)
    zs: dict[bool, list[float]] = {}
    for enabled in (True, False):
        cfg = ServeConfig(model=str(model_dir), watermark={"enabled": enabled, "key_file": str(key_file)})
        app = create_app(Engine(model, t, max_batch_size=8), t, cfg, None)
        with BackgroundServer(app) as srv:
            client = OpenAI(base_url=srv.url + "/v1", api_key="none")
            texts = [
                client.completions.create(
                    model=cfg.model_name or model_dir.name,
                    prompt="To be",
                    max_tokens=N_TOKENS,
                    temperature=1.0,
                    seed=i,
                    extra_body={"ignore_eos": True},
                )
                .choices[0]
                .text
                for i in range(12)
            ]
        app.state.close()
        zs[enabled] = [Watermark(KEY).detect(t.encode(text)).z for text in texts]
    assert min(zs[True]) >= 4.0, zs[True]
    assert max(zs[False]) < 4.0, zs[False]
