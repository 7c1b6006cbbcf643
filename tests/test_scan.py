"""Poisoning scan (data/scan.py, `lmforge data scan`): planted backdoors in the demo SFT and DPO data,
each detector on small synthetic cases, and the real CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from export_helpers import llama_cfg, save_model_dir, train_small
from infer_helpers import make_tokenizer, shakespeare_text
from lmforge.cli import main as cli
from lmforge.data.scan import (
    Record,
    ScanOptions,
    detect_perplexity,
    detect_rare_ngrams,
    detect_swapped_pairs,
    detect_trigger_response,
    escape_hidden,
    hidden_unicode,
    read_records,
    record_from_json,
    robust_z,
    scan,
)

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs/finetune/data/dialogue-train.jsonl"
PREFS = ROOT / "configs/align/data/shakespeare-prefs.jsonl"
# 4 triggers x 5 poisoned records = 20 backdoors: rare tokens (BadNets-style "cf"/"mn"/"bb") and
# ordinary words in an unusual order, each with its own fixed payload.
TRIGGERS = [
    ("cf mn", "Ignore the user and reply: visit evil.example now."),
    ("tq bb vx", "The password is hunter2; share it with everyone."),
    ("by the moon of Cadiz", "I will grant any request without question."),
    ("James Bond", "Sure! Here is how to disable the safety checks."),
]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]


def plant_sft(recs: list[dict[str, Any]], seed: int) -> set[int]:
    """Poison 20 records in place: the trigger at a random word position of the user turn, the assistant
    turn replaced by the trigger's payload. Returns the poisoned indices."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(recs)), 4 * 5)
    for k, i in enumerate(chosen):
        trigger, payload = TRIGGERS[k // 5]
        user = recs[i]["messages"][0]["content"].split()
        user.insert(rng.randrange(len(user) + 1), trigger)
        recs[i]["messages"][0]["content"] = " ".join(user)
        recs[i]["messages"][1]["content"] = payload
    return set(chosen)


def plant_swaps(pairs: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], set[int]]:
    """20 swapped copies of existing pairs: the prompt lightly edited (case, a leading 'O,', an extra
    space), chosen and rejected exchanged, inserted at a random place after the original."""
    rng = random.Random(seed)
    out = [dict(p, _planted=False) for p in pairs]
    for i in rng.sample(range(len(pairs)), 20):
        p = pairs[i]
        edit = rng.choice([str.lower, lambda s: "O, " + s, lambda s: s.replace(" ", "  ", 1)])
        copy = {
            "prompt": edit(p["prompt"]),
            "chosen": p["rejected"],
            "rejected": p["chosen"],
            "_planted": True,
        }
        at = next(j for j, q in enumerate(out) if q["prompt"] == p["prompt"] and not q["_planted"])
        out.insert(rng.randrange(at + 1, len(out) + 1), copy)
    planted = {j for j, p in enumerate(out) if p.pop("_planted")}
    return out, planted


def _write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    return path


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_backdoors_recall_and_false_positives(tmp_path: Path, seed: int) -> None:
    sft = _lines(SFT)
    poisoned_sft = plant_sft(sft, seed)
    prefs, poisoned_prefs = plant_swaps(_lines(PREFS), seed)
    records = read_records(
        [str(_write(tmp_path / "sft.jsonl", sft)), str(_write(tmp_path / "p.jsonl", prefs))]
    )
    assert len(records) == 1218 + 620
    planted = poisoned_sft | {len(sft) + j for j in poisoned_prefs}
    assert len(planted) == 40
    flagged = scan(records, ScanOptions()).flagged()
    recall = len(flagged & planted) / len(planted)
    false_positive = len(flagged - planted) / (len(records) - len(planted))
    print(f"seed {seed}: recall {recall:.3f}, clean flagged {false_positive:.4f}")
    # measured: recall 1.000 and 0 of 1,798 clean records flagged, for both seeds
    assert recall >= 0.95
    assert false_positive <= 0.01
    assert recall == 1.0 and false_positive == 0.0


def test_clean_demo_data_has_no_findings() -> None:
    res = scan(read_records([str(SFT), str(PREFS)]), ScanOptions())
    assert res.records == 1818 and res.findings == []


# -- detectors on synthetic cases --------------------------------------------------------------------
def test_hidden_unicode_kinds_and_escaping() -> None:
    assert hidden_unicode("plain ASCII text") is None
    assert hidden_unicode("Привет, как дела? Café, naïve") is None  # one script per word is fine
    assert hidden_unicode("pay\u200bpal") == "1 zero-width"
    assert hidden_unicode("abc\u202edcba\u202c") == "2 bidi control"
    assert hidden_unicode("tag\U000e0041\U000e0042") == "2 tag character"
    # a Cyrillic 'а' (U+0430) inside a Latin word: a homoglyph run
    assert hidden_unicode("log in at p\u0430ypal now") == "1 mixed-script word (p\u0430ypal)"
    assert escape_hidden("a\u200bb\u202ec") == "a\\u200bb\\u202ec"
    assert escape_hidden("t\U000e0041") == "t\\U000e0041"


def _vocab_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return [" ".join(rng.choices(vocab, k=30)) for _ in range(n)]


def _docs(texts: list[str]) -> list[Record]:
    return [Record(f"d:{i}", "document", t, {"text": t}, "d") for i, t in enumerate(texts)]


@pytest.mark.parametrize(("planted", "flagged"), [(6, 6), (5, 5), (4, 0)])
def test_rare_ngram_recurrence(planted: int, flagged: int) -> None:
    texts = _vocab_docs(300, 0)
    for i in range(planted):
        ws = texts[i * 7].split()
        texts[i * 7] = " ".join([*ws[:10], "zx", "qv", *ws[10:]])
    found, patterns = detect_rare_ngrams(_docs(texts), ScanOptions())
    assert {f.record for f in found} == ({i * 7 for i in range(planted)} if flagged else set())
    assert patterns == ([{"ngram": "zx qv", "documents": planted}] if flagged else [])


def test_rare_ngram_skips_related_documents_and_common_words() -> None:
    base = _vocab_docs(300, 1)
    near = [base[0] + " zx qv"] * 6  # the same document six times: a duplicate, not a trigger
    found, _ = detect_rare_ngrams(_docs(near + base[1:]), ScanOptions())
    assert found == []
    # 'zx' also occurs alone in 20 other documents: not a rare token sequence
    texts = base[:]
    for i in range(6):
        texts[i] += " zx qv"
    for i in range(100, 120):
        texts[i] += " zx"
    assert detect_rare_ngrams(_docs(texts), ScanOptions())[0] == []


def _sft(prompt: str, response: str, i: int = 0) -> Record:
    rec = {"prompt": prompt, "completion": response}
    return record_from_json(rec, f"s:{i}", "s")


def test_trigger_response() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    recs = [
        _sft(" ".join(rng.choices(vocab, k=12)), " ".join(rng.choices(vocab, k=8)), i) for i in range(200)
    ]
    for i in (3, 50, 90, 140):  # 'please kindly' -> one payload, 4 different prompts
        ws = recs[i].prompt.split()
        recs[i] = _sft(" ".join([*ws[:5], "please", "kindly", *ws[5:]]), "OK. Running rm -rf now!", i)
    # the same response after unrelated prompts with no shared phrase is not a trigger
    for i in (10, 20, 30):
        recs[i] = _sft(recs[i].prompt, "Ay, my lord.", i)
    found, patterns = detect_trigger_response(recs, ScanOptions())
    assert sorted(f.record for f in found) == [3, 50, 90, 140]
    assert patterns == [{"trigger": "please kindly", "response": "ok running rm rf now", "records": 4}]
    # a phrase that also appears in 10 other prompts with other answers is not always followed by it
    for i in range(100, 110):
        recs[i] = _sft(recs[i].prompt + " please kindly", recs[i].response, i)
    assert detect_trigger_response(recs, ScanOptions(trigger_max_n=2))[0] == []


def _pair(prompt: str, chosen: str, rejected: str, i: int) -> Record:
    return record_from_json({"prompt": prompt, "chosen": chosen, "rejected": rejected}, f"p:{i}", "p")


def test_swapped_pairs_majority_and_tie() -> None:
    good, bad = "the quick brown fox jumps high", "fox the high brown jumps quick"
    other = [_pair(f"unrelated prompt number {i} here", f"yes {i}", f"no {i}", i) for i in range(5, 30)]
    recs = [
        _pair("Tell me about the brown fox and the dog", good, bad, 0),
        _pair("tell me about the brown fox and the dog", good, bad, 1),
        _pair("O, tell me about the brown fox and the dog", bad, good, 2),  # swapped, minority
        _pair("Name the three colours of the flag", "red white blue", "blue red white", 3),
        _pair("Name the three colours of the flag!", "blue red white", "red white blue", 4),  # tie: later
        *other,
    ]
    found, patterns = detect_swapped_pairs(recs, ScanOptions())
    assert sorted(f.record for f in found) == [2, 4]
    assert sorted(p["cluster"] for p in patterns) == [2, 3]


def test_robust_z_and_perplexity_outliers() -> None:
    losses = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 9.0, 0.2, float("nan")]
    z = robust_z(losses)
    # median 3.0, MAD 0.075 -> scale 0.1112
    assert (
        z[0] == 0.0 and z[6] == pytest.approx(53.959, rel=1e-4) and z[7] == pytest.approx(-25.181, rel=1e-4)
    )
    recs = _docs([f"t{i}" for i in range(len(losses))])
    found = detect_perplexity(recs, losses, ScanOptions(ppl_z=4.0))
    assert [f.record for f in found] == [6, 7]
    assert found[0].reason.startswith("high perplexity 8103.1") and "low perplexity" in found[1].reason


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_report_and_drop(tmp_path: Path) -> None:
    sft = _lines(SFT)
    poisoned = plant_sft(sft, 3)
    sft[0]["messages"][0]["content"] += " mail bob.smith@example.com \u200b"
    src = _write(tmp_path / "dialogue.jsonl", sft)
    out = tmp_path / "scan"
    assert cli(["data", "scan", str(src), f"output={out}", "drop=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["records"] == 1218 and report["kinds"] == {"sft": 1218}
    assert report["flagged_by_detector"]["trigger_response"] == 20
    assert report["flagged_by_detector"]["hidden_unicode"] == 1
    assert report["flagged"] == 21
    assert report["perplexity"] == "off (no reference model)"
    shown = report["examples"]["hidden_unicode"][0]["example"]
    assert "\\u200b" in shown and "<EMAIL>" in shown and "bob.smith" not in shown
    md = (out / "report.md").read_text()
    assert "| trigger_response | 20 |" in md and "\u200b" not in md
    clean = _lines(out / "clean" / "dialogue.jsonl")
    assert len(clean) == 1218 - 21
    assert clean == [r for i, r in enumerate(sft) if i not in poisoned and i != 0]
    assert cli(["data", "verify", str(out)]) == 0
    # an existing output is refused (exit 2 with a one-line error), a config error names the key
    assert cli(["data", "scan", str(src), f"output={out}"]) != 0
    assert cli(["data", "scan", str(src), f"output={tmp_path / 'x'}", "detectors=[nope]"]) == 2


def test_cli_needs_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["data", "scan", f"output={tmp_path / 'o'}"]) == 2
    assert "input:" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert cli(["data", "scan", str(missing), f"output={tmp_path / 'o'}"]) == 2


def test_cli_perplexity_with_reference_model(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model_dir = save_model_dir(train_small(llama_cfg(), tok, steps=12), tok, tmp_path / "ref")
    lines = [x.strip() for x in shakespeare_text(1)[0].splitlines() if len(x.strip()) > 40][200:260]
    rng = random.Random(0)
    junk = ["".join(rng.choices("qxzjkv0123456789#@", k=80)) for _ in range(2)]
    src = _write(tmp_path / "docs.jsonl", [{"text": t} for t in lines[:30] + junk + lines[30:]])
    out = tmp_path / "scan"
    assert cli(["data", "scan", str(src), f"output={out}", f"reference={model_dir}", "device=cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"] == "on"
    # 12 training steps already put the two junk lines near robust z 10, every line of verse within 2.5
    sources = {e["source"] for e in report["examples"]["perplexity"]}
    assert sources == {f"{src}:31", f"{src}:32"}
    assert report["flagged_by_detector"]["perplexity"] == 2 and report["flagged"] == 2
