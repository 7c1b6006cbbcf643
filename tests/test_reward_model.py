"""Reward models: the Bradley-Terry loss by hand, `lmforge align reward` on a planted preference, parity of
the saved folder with transformers' AutoModelForSequenceClassification, exact resume, and `lmforge eval`
scoring a responses JSONL.

The planted preference: each chosen reply opens with "Ay, " and the rejected one with "Nay, " (the rest
of the line is the same), which a random 2-layer model learns in a few dozen steps.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.preference import PairEncoder, PairSampler, load_pairs, score_collate
from lmforge.errors import DataError
from lmforge.model.config import ModelConfig
from lmforge.model.reward import RewardModel, encode_scored, last_token_index, load_reward_model, score_texts
from lmforge.model.transformer import build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.objectives import RewardObjective, bradley_terry_loss
from train_helpers import shakespeare_text

VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = shakespeare_text(200_000)
    return train_tokenizer([p for p in text.split("\n\n") if p.strip()], vocab_size=VOCAB)


def lines(n: int, seed: int = 0) -> list[str]:
    pool = sorted({x.strip() for x in shakespeare_text(400_000).splitlines() if 20 <= len(x.strip()) <= 50})
    random.Random(seed).shuffle(pool)
    return pool[:n]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def planted_pairs(n: int, seed: int) -> list[dict[str, str]]:
    pool = lines(2 * n, seed)
    return [
        {
            "prompt": pool[2 * i] + "\n",
            "chosen": "Ay, " + pool[2 * i + 1],
            "rejected": "Nay, " + pool[2 * i + 1],
        }
        for i in range(n)
    ]


def tiny_backbone(seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128
    )
    return build_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def setup(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny lmforge model folder (with its tokenizer) and the planted preference files."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("rm")
    model = tiny_backbone(seed=1)
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    (base / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")), "utf-8")
    tok.save(base)
    pool = planted_pairs(240, seed=2)
    return {
        "base": base,
        "train": write_jsonl(root / "train.jsonl", pool[:200]),
        "train_subset": write_jsonl(root / "train_subset.jsonl", pool[:64]),
        "eval": write_jsonl(root / "eval.jsonl", pool[200:]),
        "small_train": write_jsonl(root / "small_train.jsonl", pool[:48]),
        "root": root,
    }


def rm_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model={setup['base']}",
        f"data={setup['train']}",
        f"eval_data={setup['eval']}",
        f"output={out}",
        "max_len=64",
        "max_prompt_len=32",
        "global_batch=16",
        "micro_batch=8",
        "optim.lr=5e-3",
        "schedule.warmup_steps=2",
        "lora.rank=4",
        "log_every=1",
        "eval.every=0",
        "eval.batch_size=20",
        "checkpoint.every=0",
        "progress=false",
        "tensorboard=false",
        "threads=1",
        *extra,
    ]


def run_rm(args: list[str], **trainer_kw: object) -> int:
    from lmforge.config import load_config
    from lmforge.train.reward import RewardConfig, train

    return train(load_config(RewardConfig, None, args), **trainer_kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(setup: dict[str, Path]) -> Path:
    """A LoRA reward model trained 25 steps on the planted pairs, through the real CLI."""
    from lmforge.cli import main

    out = setup["root"] / "lora-run"
    assert main(["align", "reward", *rm_args(setup, out, "max_steps=25")]) == 0
    return out


# -- the loss ------------------------------------------------------------------------------------------
def test_bradley_terry_loss_equals_the_formula_by_hand() -> None:
    c = torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64)
    r = torch.tensor([0.5, 0.75, 3.0], dtype=torch.float64)
    for m in (torch.zeros(3, dtype=torch.float64), torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)):
        got = bradley_terry_loss(c, r, m)
        for i in range(3):
            z = float(c[i]) - float(r[i]) - float(m[i])
            assert abs(float(got[i]) - math.log1p(math.exp(-z))) < 1e-12
    # pair 0 without margin: z = 1 -> log(1 + e^-1); a margin of 1 makes it log 2
    assert float(bradley_terry_loss(c[:1], r[:1], torch.zeros(1))[0]) == pytest.approx(0.31326168751822286)
    assert float(bradley_terry_loss(c[:1], r[:1], torch.ones(1))[0]) == pytest.approx(math.log(2), abs=1e-12)


def test_objective_scores_the_last_real_token_of_padded_rows(tok: Tokenizer, tmp_path: Path) -> None:
    recs = [dict(p, margin=0.5 * i) for i, p in enumerate(planted_pairs(6, seed=3))]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", recs), tok, max_len=64, max_prompt_len=32)
    assert [p.margin for p in pairs] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    batch = score_collate(pairs, tok.pad_id)
    assert len({len(p.chosen) for p in pairs} | {len(p.rejected) for p in pairs}) > 1  # the batch has padding
    model = RewardModel(tiny_backbone(), tok.pad_id, seed=0)
    objective = RewardObjective()
    with torch.no_grad():
        loss_sum, n = objective(model, batch)
        want = 0.0
        for p in pairs:  # each sequence alone, unpadded: the score of its last position
            sc, sr = (float(model(torch.from_numpy(s)[None])[0]) for s in (p.chosen, p.rejected))
            want += math.log1p(math.exp(-(sc - sr - p.margin)))
    assert int(n) == 6 and float(loss_sum) == pytest.approx(want, abs=1e-5)
    assert objective.pop_metrics()["reward_accuracy"] in {k / 6 for k in range(7)}
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 7, 8, 0], [0, 0, 0, 0, 0]])
    assert last_token_index(ids, 0).tolist() == [2, 3, 0]


def test_bad_margin_and_missing_fields_name_file_and_line(tok: Tokenizer, tmp_path: Path) -> None:
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "x"}]
    )
    with pytest.raises(DataError, match=r"bad.jsonl:1: key 'margin' must be a number"):
        load_pairs(bad, tok, max_len=64, max_prompt_len=32)


def test_scoring_encodes_as_the_training_data(tok: Tokenizer) -> None:
    enc = PairEncoder(tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    for prompt in ("To be, or not\n", chat):
        p, c, _, _ = enc.encode({"prompt": prompt, "chosen": "Ay, to be", "rejected": "no"}, "x")
        assert encode_scored(tok, prompt, "Ay, to be") == p + c


# -- `lmforge align reward` end to end -----------------------------------------------------------------
def test_lora_reward_model_learns_the_planted_preference(trained: Path, setup: dict[str, Path]) -> None:
    from lmforge.data.manifest import verify_manifest
    from lmforge.train.metrics import read_metrics

    report = json.loads((trained / "report.json").read_text())
    assert report["train_pairs"] == 200 and report["held_out_pairs"] == 40 and report["steps"] == 25
    before, after = report["before"], report["after"]
    assert before["step"] == 0 and after["step"] == 25
    assert after["accuracy"] >= 0.95 and after["loss"] < 0.3 and after["loss"] < before["loss"]
    assert after["margin"] > 1.0 and after["chosen"] > after["rejected"]
    evals = read_metrics(trained / "metrics.jsonl", "eval")
    assert {"val_accuracy", "val_loss"} <= set(evals[-1])
    train_rows = read_metrics(trained / "metrics.jsonl", "train")
    assert len(train_rows) == 25 and train_rows[0]["tokens"] == 16 and "reward_accuracy" in train_rows[-1]
    # the checkpoint holds the adapters and the head only; model/ is a merged HF folder
    from safetensors.torch import load_file

    ckpt = load_file(str(trained / "checkpoints" / "step-000025" / "model.safetensors"))
    assert "score.weight" in ckpt and all(
        k.endswith(("lora_A", "lora_B")) or k == "score.weight" for k in ckpt
    )
    hf_cfg = json.loads((trained / "model" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg["num_labels"] == 1
    assert verify_manifest(trained)["files"]
    # on pairs it was trained on: the planted preference is learned
    model, tok = load_reward_model(trained / "model")
    recs = [json.loads(x) for x in setup["train_subset"].read_text().splitlines()]
    chosen = score_texts(model, tok, [r["prompt"] for r in recs], [r["chosen"] for r in recs], batch_size=16)
    rejected = score_texts(
        model, tok, [r["prompt"] for r in recs], [r["rejected"] for r in recs], batch_size=16
    )
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(recs)
    assert acc >= 0.95


def test_transformers_scores_equal_ours_with_padding(trained: Path, setup: dict[str, Path]) -> None:
    import transformers

    model, tok = load_reward_model(trained / "model")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(trained / "model"), dtype=torch.float32
    ).eval()
    recs = [json.loads(x) for x in setup["eval"].read_text().splitlines()][:12]
    rows = [encode_scored(tok, r["prompt"], r[k]) for r in recs for k in ("chosen", "rejected")]
    assert len({len(r) for r in rows}) > 1
    ids = torch.full((len(rows), max(len(r) for r in rows)), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = model(ids)
    assert theirs.shape == ours.shape == (24,)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(
        torch.tensor(score_texts(model, tok, [r["prompt"] for r in recs], [r["chosen"] for r in recs])),
        theirs[0::2],
        atol=1e-5,
        rtol=0,
    )


def test_full_resume_is_bit_exact(setup: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lmforge.train.loop import Interrupted
    from lmforge.train.metrics import read_metrics

    args = ["method=full", "optim.lr=1e-3", "max_steps=5", f"data={setup['small_train']}"]
    assert run_rm(rm_args(setup, tmp_path / "a", *args)) == 0
    b = tmp_path / "b"
    with pytest.raises(Interrupted):
        run_rm(rm_args(setup, b, *args), should_stop=lambda step, micro: step == 3 and micro == 0)
    assert run_rm(rm_args(setup, b, *args, "resume=auto")) == 0
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "train")}
    lb = {r["step"]: r["loss"] for r in read_metrics(b / "metrics.jsonl", "train")}
    assert la == lb and len(la) == 5
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(b / "model" / "model.safetensors"))
    assert set(wa) == set(wb) and "score.weight" in wa and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_margin_changes_the_loss_as_the_formula_says(setup: dict[str, Path], tmp_path: Path) -> None:
    """A margin of m on every pair: the step-0 held-out loss is the mean of -logsigmoid(d - m)."""
    from lmforge.train.metrics import read_metrics

    recs = [json.loads(x) for x in setup["eval"].read_text().splitlines()]
    with_margin = write_jsonl(tmp_path / "m.jsonl", [dict(r, margin=2.0) for r in recs])
    common = ("max_steps=1", "method=full", f"data={setup['small_train']}")
    assert run_rm(rm_args(setup, tmp_path / "a", *common)) == 0
    assert run_rm(rm_args(setup, tmp_path / "b", *common, f"eval_data={with_margin}")) == 0
    ea = read_metrics(tmp_path / "a" / "metrics.jsonl", "eval")[0]
    eb = read_metrics(tmp_path / "b" / "metrics.jsonl", "eval")[0]
    assert ea["val_margin"] == pytest.approx(eb["val_margin"], abs=1e-9)  # same model, same scores
    assert eb["val_loss"] > ea["val_loss"]
    pairs, _ = load_pairs(setup["eval"], load_reward_model_tok(setup), max_len=64, max_prompt_len=32)
    model = RewardModel(tiny_backbone(seed=1), load_reward_model_tok(setup).pad_id, seed=0)
    batches = PairSampler(pairs, global_batch=40, micro_batch=40, pad_id=0, collate_fn=score_collate)
    assert batches.micro_batches(0)[0]["margin"].tolist() == [0.0] * 40
    with torch.no_grad():
        s = model(score_collate(pairs, load_reward_model_tok(setup).pad_id)["input_ids"])
    d = s[:40] - s[40:]
    assert ea["val_loss"] == pytest.approx(
        float(bradley_terry_loss(d, torch.zeros(1), torch.zeros(1)).mean()), abs=1e-5
    )
    assert eb["val_loss"] == pytest.approx(
        float(bradley_terry_loss(d, torch.zeros(1), torch.full((1,), 2.0)).mean()), abs=1e-5
    )


def load_reward_model_tok(setup: dict[str, Path]) -> Tokenizer:
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(setup["base"])


# -- eval and the GRPO reward --------------------------------------------------------------------------
def test_eval_scores_a_responses_jsonl(trained: Path, setup: dict[str, Path], tmp_path: Path) -> None:
    from lmforge.cli import main

    recs = [json.loads(x) for x in setup["eval"].read_text().splitlines()][:10]
    rows: list[dict[str, object]] = [
        {"prompt": r["prompt"], "response": r[k]} for r in recs for k in ("chosen", "rejected")
    ]
    rows.append({"prompt": [{"role": "user", "content": recs[0]["prompt"]}], "response": recs[0]["chosen"]})
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    out = tmp_path / "scores"
    assert (
        main(["eval", f"reward_model={trained / 'model'}", f"data={data}", f"output={out}", "batch_size=3"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())["scores"]
    model, tok = load_reward_model(trained / "model")
    prompts: list[Any] = [r["prompt"] for r in rows]
    want = score_texts(model, tok, prompts, [str(r["response"]) for r in rows], batch_size=21)
    assert report["n"] == 21 and report["scores"] == pytest.approx(want, abs=1e-5)
    mean = sum(want) / 21
    assert report["mean"] == pytest.approx(mean, abs=1e-5)
    assert report["std"] == pytest.approx(math.sqrt(sum((w - mean) ** 2 for w in want) / 21), abs=1e-5)
    assert sum(report["scores"][0:20:2]) > sum(report["scores"][1:20:2])  # chosen ("Ay, ") scores higher


def test_bad_input_is_one_line_exit_2(
    trained: Path, setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.cli import main

    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    args = ["eval", f"reward_model={trained / 'model'}", f"data={data}", f"output={tmp_path / 'o'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:2: missing key 'response'" in err and len(err.splitlines()) == 1
    bad = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a"}]
    )
    assert main(["align", "reward", *rm_args(setup, tmp_path / "run", f"data={bad}")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [
        x for x in err.splitlines() if x.startswith("error:")
    ]  # (a "note:" says the base has no manifest)
    assert len(errors) == 1 and f"{bad}:2: missing key 'chosen'" in errors[0]
    assert main(["eval", f"reward_model={setup['base']}", f"data={data}", f"output={tmp_path / 'o'}"]) == 2
    assert "not a reward model folder" in capsys.readouterr().err


def test_grpo_reward_function_scores_completions(trained: Path) -> None:
    from lmforge.train.rewards_rm import RewardModelReward, RewardModelRewardConfig

    reward = RewardModelReward(str(trained / "model"), batch_size=2)
    chat = [{"role": "user", "content": "Speak"}]
    got = reward(
        ["Speak\n", "ignored"], ["Ay, to be", "Nay, to be"], [{"prompt": "Speak\n"}, {"prompt": chat}]
    )
    want = score_texts(reward.model, reward.tok, ["Speak\n", chat], ["Ay, to be", "Nay, to be"])
    assert got == pytest.approx(want, abs=1e-6) and len(got) == 2
    cfg = RewardModelRewardConfig.model_validate({"kind": "reward_model", "path": "x", "weight": 0.5})
    assert cfg.batch_size == 8 and cfg.weight == 0.5
    # through align grpo's registry: weight 0.5 and a second function, as a rewards: list declares them
    from lmforge.train.rewards import build_rewards, score

    specs = [
        {"kind": "reward_model", "path": str(trained / "model"), "weight": 0.5, "batch_size": 2},
        {"kind": "exact_match", "field": "answer"},
    ]
    rows = [{"prompt": "Speak\n", "answer": "Ay, to be"}, {"prompt": chat, "answer": "no"}]
    totals, per = score(build_rewards(specs), ["Speak\n", "ignored"], ["Ay, to be", "Nay, to be"], rows)
    assert per["reward_model"] == pytest.approx(want, abs=1e-6)
    assert totals == pytest.approx([0.5 * want[0] + 1.0, 0.5 * want[1]], abs=1e-6)


def test_an_untied_decoder_saves_without_its_lm_head_and_loads_back(tok: Tokenizer, tmp_path: Path) -> None:
    """The LM head a reward model never reads is dropped; transformers and our loader agree on the scores."""
    import transformers

    from lmforge.model.reward import pad_rows, save_reward_hf

    cfg = ModelConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64,
        tie_embeddings=False,
    )  # fmt: skip
    model = RewardModel(build_model(cfg, seed=3), tok.pad_id, seed=4)
    assert model.backbone.output is None and model.cfg.tie_embeddings
    save_reward_hf(model, tok, tmp_path / "rm")
    rows = [encode_scored(tok, "To be, or not\n", r) for r in ("to be", "that is the question")]
    rows.append(encode_scored(tok, [{"role": "user", "content": "Speak"}], "Ay"))
    ids = pad_rows(rows, tok.pad_id)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    loaded, _ = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        ours, back, theirs = model(ids), loaded(ids), hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.equal(ours, back) and torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_eval_needs_one_of_its_two_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(["eval", f"output={tmp_path / 'o'}"]) == 2
    assert "give model and tasks (or reward_model and data" in capsys.readouterr().err
    assert main(["eval", "reward_model=x", "model=y", f"data={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.lower()
    assert "reward_model: give data (a responses jsonl), and no model or tasks" in err
