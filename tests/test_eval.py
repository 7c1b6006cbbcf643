"""lmforge eval: perplexity / bits per byte against hand computations with `transformers` logits (text
files with a sliding window, token shards), MC accuracy where the model's preference is known, BLEU equal
to sacrebleu's, exact match, and the command's report files and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
sacrebleu = pytest.importorskip("sacrebleu")

from infer_helpers import make_tokenizer, save_hf_model, shakespeare_text  # noqa: E402
from lmforge.errors import DataError  # noqa: E402
from lmforge.eval.perplexity import shards_perplexity, text_perplexity  # noqa: E402
from lmforge.eval.tasks import encode_pair, generation, multiple_choice, score_continuations  # noqa: E402
from lmforge.infer.engine import Engine, GenerationRequest  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.source import load_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer()
    hf = save_hf_model("llama", tok, root / "hf", seed=1)
    model, t = load_model(root / "hf")
    return {"root": root, "tok": t, "hf": hf, "model": model, "path": root / "hf"}


def _nll_by_hand(hf: Any, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """HF's documented sliding-window recipe, written out: every token after the first scored once."""
    total, count, prev_end = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        x = torch.tensor([ids[begin:end]])
        y = torch.tensor(ids[begin + 1 : end + 1])
        with torch.no_grad():
            logp = F.log_softmax(hf(x).logits[0].double(), -1)
        for j in range(end - begin):
            if begin + 1 + j >= prev_end:
                total -= float(logp[j, y[j]])
                count += 1
        prev_end = end + 1
        if end == len(ids) - 1:
            break
    return total, count


def test_text_perplexity_and_bpb_equal_hand_computation(setup: dict[str, Any], tmp_path: Path) -> None:
    tok: Tokenizer = setup["tok"]
    text = shakespeare_text(1)[0][:1200] + " — naïve café"  # multi-byte characters: bytes != chars
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    ids = [tok.eos_id, *tok.encode(text)]
    for seq_len, stride in ((128, 128), (64, 24)):
        r = text_perplexity(setup["model"], tok, [f], seq_len=seq_len, stride=stride, batch_size=3)
        nll, n = _nll_by_hand(setup["hf"], ids, seq_len, stride)
        assert r["tokens"] == n == len(ids) - 1
        assert r["loss"] == pytest.approx(nll / n, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert r["bytes"] == len(text.encode("utf-8")) > len(text)
        assert r["bits_per_byte"] == pytest.approx(nll / (len(text.encode("utf-8")) * math.log(2)), rel=1e-5)
    short = text_perplexity(setup["model"], tok, [f], seq_len=128, stride=128)
    overlap = text_perplexity(setup["model"], tok, [f], seq_len=128, stride=32)
    assert short["loss"] != overlap["loss"]  # more context per token changes the number
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: no text to score"):
        text_perplexity(setup["model"], tok, [empty], seq_len=128)


def test_shards_perplexity_equals_hand_computation(setup: dict[str, Any]) -> None:
    from lmforge.data.manifest import write_manifest
    from lmforge.data.shards import ShardSet
    from lmforge.data.tokenize import TokenizeConfig, run
    from tokenizer_corpus import shakespeare_docs, write_curated

    root = setup["root"]
    docs = shakespeare_docs(files=1)[:30]
    curated = write_curated(root / "curated", docs)
    setup["tok"].save(root / "tok")
    write_manifest(root / "tok", stage="tokenizer train")
    run(TokenizeConfig(input=curated, tokenizer=root / "tok", output=root / "tokens", val_fraction=0.2))
    shards = ShardSet(root / "tokens", "val")
    r = shards_perplexity(setup["model"], root / "tokens", split="val", seq_len=128, max_tokens=1500)
    stream = [setup["tok"].eos_id, *[int(x) for a in shards.arrays for x in a]][: 1500 + 1]
    nll, n = _nll_by_hand(setup["hf"], stream, 128, 128)
    assert r["tokens"] == n == min(1500, shards.num_tokens)
    assert r["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert r["bytes"] == round(shards.num_bytes * n / shards.num_tokens)
    assert r["bits_per_byte"] == pytest.approx(nll / (r["bytes"] * math.log(2)), rel=1e-5)
    setup["tokens"] = root / "tokens"


def test_score_continuations_equals_one_forward_by_hand(setup: dict[str, Any]) -> None:
    tok, hf = setup["tok"], setup["hf"]
    pairs = [
        encode_pair(tok, "To be, or not to ", "be"),
        encode_pair(tok, "", "KING"),
        encode_pair(tok, "O", " Romeo"),
    ]
    assert pairs[0][1][0] == tok.encode(" be")[0]  # the trailing space moved to the continuation, as lm-eval
    got = score_continuations(setup["model"], pairs, max_len=128, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        with torch.no_grad():
            logp = F.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)
        rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
        assert ll == pytest.approx(float(sum(rows[i, t] for i, t in enumerate(cont))), rel=1e-5)
        assert greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(cont))


def _mc_file(setup: dict[str, Any], path: Path) -> tuple[Path, float, float]:
    """10 examples whose gold is the choice `transformers` prefers on odd rows and the one it likes least on
    even rows: acc must be 0.5; acc_norm is computed from the same HF log-likelihoods by hand."""
    tok, hf = setup["tok"], setup["hf"]
    texts = shakespeare_text(1)[0].split()
    rows, hand_norm = [], 0
    for i in range(10):
        ctx = " ".join(texts[i * 7 : i * 7 + 6])
        choices = [texts[200 + i * 3 + j] for j in range(3)] + ["and"]
        lls = []
        for c in choices:
            cids, cont = encode_pair(tok, ctx, " " + c)
            with torch.no_grad():
                logp = F.log_softmax(hf(torch.tensor([cids + cont])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(cids) - 1 + k, t]) for k, t in enumerate(cont)))
        order = sorted(range(len(choices)), key=lls.__getitem__)
        gold = order[-1] if i % 2 else order[0]
        normed = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        hand_norm += int(max(range(len(choices)), key=normed.__getitem__) == gold)
        rows.append({"query": ctx, "choices": choices, "gold": gold})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, 0.5, hand_norm / 10


def test_multiple_choice_accuracy_is_known(setup: dict[str, Any], tmp_path: Path) -> None:
    path, acc, acc_norm = _mc_file(setup, tmp_path / "mc.jsonl")
    r = multiple_choice(setup["model"], setup["tok"], path, batch_size=5)
    assert r["n"] == 10 and r["acc"] == acc and r["acc_norm"] == acc_norm
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(DataError, match="example 1: 'gold' must be an index into the 2 choices"):
        multiple_choice(setup["model"], setup["tok"], bad)


def test_generation_bleu_equals_sacrebleu_and_exact_match(setup: dict[str, Any], tmp_path: Path) -> None:
    tok = setup["tok"]
    engine = Engine(setup["model"], tok)
    prompts = ["KING", "To be, or not", "O Romeo", "Enter", "The queen", "My lord"]
    params = SamplingParams(max_tokens=8, temperature=0, stop=["\n"], seed=0)
    outs = [c.text for c in engine.generate([GenerationRequest(tok.encode(p), params) for p in prompts])]
    refs: list[Any] = [o if i % 2 == 0 else "the king is dead" for i, o in enumerate(outs)]
    refs[1] = ["long live the king", outs[1]]  # a list of references; the second is exact
    f = tmp_path / "gen.jsonl"
    f.write_text("".join(json.dumps({"q": p, "a": r}) + "\n" for p, r in zip(prompts, refs, strict=True)))
    r = generation(engine, f, prompt_field="q", reference_field="a", max_tokens=8)
    assert r["exact_match"] == pytest.approx(4 / 6)
    streams = [
        [r if isinstance(r, str) else r[0] for r in refs],
        [r if isinstance(r, str) else r[1] for r in refs],
    ]
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, streams).score, abs=1e-9)
    assert [e["output"] for e in r["examples"]] == outs[:5]


def test_eval_command_writes_reports(setup: dict[str, Any], tmp_path: Path) -> None:
    from lmforge.cli import main
    from lmforge.data.manifest import verify_manifest

    mc, acc, _ = _mc_file(setup, tmp_path / "mc.jsonl")
    txt = tmp_path / "t.txt"
    txt.write_text(shakespeare_text(1)[0][:1500])
    cfg = {
        "model": str(setup["path"]),
        "output": str(tmp_path / "report"),
        "tasks": [
            {"type": "perplexity", "name": "text", "data": [str(txt)], "seq_len": 64},
            {"type": "multiple_choice", "data": str(mc)},
        ],
    }
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))
    assert main(["eval", "-c", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ppl = text_perplexity(setup["model"], setup["tok"], [txt], seq_len=64, stride=32)
    assert report["tasks"][0]["metrics"]["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-9)
    assert report["tasks"][1]["name"] == "mc" and report["tasks"][1]["metrics"]["acc"] == acc
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| text | perplexity |" in md and f"{ppl['perplexity']:.4f}" in md
    verify_manifest(tmp_path / "report")
    assert main(["eval", "-c", str(tmp_path / "eval.yaml")]) == 2  # exists, no overwrite
    assert main(["eval", f"model={setup['path']}", "output=x", "tasks=[{type: nope, data: x}]"]) == 2
