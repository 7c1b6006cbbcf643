"""GRPO: the loss against a per-element reference, REINFORCE equivalence, rewards, and `align grpo` end to end.

The end-to-end runs use a random 2-layer model and rewards that vary between its samples (a regex and a
length penalty), so advantages are non-zero and every step moves the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.batch import IGNORE_INDEX
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.grpo_data import collate_rollout, load_prompts
from lmforge.train.grpo_loss import GRPOObjective, group_advantages
from lmforge.train.rewards import build_rewards, last_number, score
from train_helpers import shakespeare_text

VOCAB = 384


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = shakespeare_text(60_000)
    return train_tokenizer([p for p in text.split("\n\n") if p.strip()], vocab_size=VOCAB)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=96
    )
    return build_model(cfg, seed=seed)


# -- the math against a straightforward reference ---------------------------------------------------------
def reference_advantages(rewards: list[float], g: int, scale: bool) -> list[float]:
    out = []
    for s in range(0, len(rewards), g):
        grp = rewards[s : s + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in grp]
    return out


def fixed_batch(
    scale: bool, per_sequence: bool, model: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Two groups of two completions; old / reference log-probs near the model's own (ratios in ~[0.4, 2.5])."""
    from lmforge.train.grpo_loss import token_logps

    gen = torch.Generator().manual_seed(3)
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9]]
    completions = [[10, 11, 12, 13], [14, 15], [16], [17, 18, 19]]
    rewards = [1.0, 0.0, 0.25, 0.75]
    adv = group_advantages(torch.tensor(rewards), 2, scale)
    batch = collate_rollout(prompts, completions, adv, 0, per_sequence=per_sequence)
    if model is not None:
        with torch.no_grad():
            lp = token_logps(model, batch["input_ids"], batch["labels"])
        shape = lp.shape
        batch["old_logps"] = lp + (torch.rand(shape, generator=gen) - 0.5) * 1.8
        batch["ref_logps"] = lp + (torch.rand(shape, generator=gen) - 0.5) * 1.0
    return batch, rewards


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
@pytest.mark.parametrize("scale", [True, False])
def test_loss_advantages_clipping_and_kl_equal_a_per_element_reference(loss_type: str, scale: bool) -> None:
    model = tiny_model(seed=2)
    batch, rewards = fixed_batch(scale, loss_type == "sequence", model)
    eps_low, eps_high, beta = 0.2, 0.28, 0.05
    want_adv = reference_advantages(rewards, 2, scale)
    assert batch["advantages"].tolist() == pytest.approx(want_adv, abs=1e-6)
    obj = GRPOObjective(beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type)  # type: ignore[arg-type]
    loss_sum, units = obj(model, batch)
    metrics = obj.pop_metrics()

    with torch.no_grad():
        logits = model(batch["input_ids"]).double().log_softmax(-1)
    total, n_units, kl_sum, clipped, tokens = 0.0, 0, 0.0, 0, 0
    for i in range(batch["labels"].shape[0]):
        row_loss, row_tokens = 0.0, 0
        for t in range(batch["labels"].shape[1]):
            y = int(batch["labels"][i, t])
            if y == IGNORE_INDEX:
                continue
            lp = float(logits[i, t, y])
            old, ref, a = float(batch["old_logps"][i, t]), float(batch["ref_logps"][i, t]), want_adv[i]
            ratio = math.exp(lp - old)
            clip = min(max(ratio, 1 - eps_low), 1 + eps_high)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            row_loss += -min(ratio * a, clip * a) + beta * kl
            kl_sum += kl
            clipped += int((ratio < 1 - eps_low and a < 0) or (ratio > 1 + eps_high and a > 0))
            row_tokens += 1
        tokens += row_tokens
        if loss_type == "token":
            total, n_units = total + row_loss, n_units + row_tokens
        else:
            total, n_units = total + row_loss / row_tokens, n_units + 1
    assert int(units) == n_units
    assert float(loss_sum.detach()) / int(units) == pytest.approx(total / n_units, abs=1e-6)
    assert metrics["kl"] == pytest.approx(kl_sum / tokens, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(clipped / tokens, abs=1e-9)
    assert 0 < metrics["clip_fraction"] < 1  # the fixed batch exercises both branches


def test_one_pass_without_kl_is_reinforce_with_a_group_mean_baseline() -> None:
    """beta 0, ratio 1 (old = current, detached): the gradient is -sum_i (r_i - mean_g) grad log p(o_i) / N."""
    batch, rewards = fixed_batch(scale=False, per_sequence=False)
    model = tiny_model(seed=4)
    obj = GRPOObjective(beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="token")
    loss_sum, units = obj(model, batch)
    (loss_sum / units).backward()
    grpo = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    logp = model(batch["input_ids"]).float().log_softmax(-1)
    surrogate, n = torch.zeros(()), 0
    for i in range(4):
        baseline = (rewards[2 * (i // 2)] + rewards[2 * (i // 2) + 1]) / 2
        for t in range(batch["labels"].shape[1]):
            y = int(batch["labels"][i, t])
            if y != IGNORE_INDEX:
                surrogate = surrogate - (rewards[i] - baseline) * logp[i, t, y]
                n += 1
    (surrogate / n).backward()
    assert grpo and all(
        torch.allclose(grpo[k], p.grad, atol=1e-6, rtol=0) for k, p in model.named_parameters()
    )
    assert max(float(g.abs().max()) for g in grpo.values()) > 1e-4  # not trivially zero


def test_advantages_of_a_constant_group_are_zero() -> None:
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), 2, True)
    assert adv[:2].tolist() == [0.0, 0.0]
    assert adv[2:].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


# -- rewards ------------------------------------------------------------------------------------------------
def user_reward(
    prompts: list[str], completions: list[str], rows: list[dict[str, Any]], bonus: float
) -> list[float]:
    return [bonus * len(c.split()) for c in completions]


def broken_reward(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    raise KeyError("oops")


def test_builtin_rewards_on_fixed_inputs() -> None:
    rewards = build_rewards(
        [
            {"kind": "exact_match", "field": "answer"},
            {"kind": "numeric_match", "field": "answer", "tol": 0.5},
            {"kind": "regex", "pattern": r"^\d+$", "weight": 0.2},
            {"kind": "length", "target": 3, "weight": -0.5},
            {"kind": "python", "function": "test_grpo:user_reward", "bonus": 2.0},
            {"kind": "regex", "pattern": "x", "full": True, "name": "only_x"},
        ]
    )
    assert [r.name for r in rewards] == [
        "exact_match",
        "numeric_match",
        "regex",
        "length",
        "python",
        "only_x",
    ]
    completions = [" 42 ", "so it is 1,041.6", "x", "41.4 or 43"]
    rows = [{"answer": "42"}, {"answer": 1041.5}, {"answer": "7"}, {"answer": 43}]
    totals, per = score(rewards, ["p"] * 4, completions, rows)
    assert per["exact_match"] == [1.0, 0.0, 0.0, 0.0]
    assert per["numeric_match"] == [1.0, 1.0, 0.0, 1.0]
    assert per["regex"] == [0.0, 0.0, 0.0, 0.0]  # " 42 " has spaces: ^\d+$ does not match
    assert per["length"] == [1.0, 13.0, 0.0, 7.0]
    assert per["python"] == [2.0, 8.0, 2.0, 6.0]
    assert per["only_x"] == [0.0, 0.0, 1.0, 0.0]
    assert totals == pytest.approx([1 + 1 - 0.5 + 2, 1 - 6.5 + 8, 2 + 1, 1 - 3.5 + 6])
    assert last_number("none here") is None and last_number("a -3 then 7.25.") == 7.25


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "regexx", "pattern": "a"}, r"rewards\[0\]\.kind: unknown reward kind 'regexx'"),
        ({"kind": "regex"}, r"rewards\[0\]\.pattern: missing required key for kind regex"),
        ({"kind": "length", "target": -1}, r"rewards\[0\]\.target: input should be greater than"),
        ({"kind": "exact_match", "feild": "a"}, r"rewards\[0\]\.feild: unknown key for kind exact_match"),
        ({"kind": "regex", "pattern": "("}, r"rewards: regex pattern '\(' does not compile"),
        (
            {"kind": "python", "function": "nosuch.mod:fn"},
            r"rewards: function 'nosuch.mod:fn' cannot be imported",
        ),
        ("exact_match", r"rewards\[0\]: expected a mapping"),
    ],
)
def test_bad_reward_yaml_is_a_one_line_config_error(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        build_rewards([spec])
    assert "\n" not in str(e.value)


def test_a_failing_user_function_is_named() -> None:
    from lmforge.train.rewards import RewardError

    [r] = build_rewards([{"kind": "python", "function": "test_grpo:broken_reward"}])
    with pytest.raises(RewardError, match=r"reward python \(test_grpo:broken_reward\) raised KeyError"):
        score([r], ["p"], ["c"], [{}])


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("grpo")
    model = tiny_model(seed=1)
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    (base / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")), "utf-8")
    tok.save(base)
    words = ["king", "queen", "night", "sword", "crown", "heart", "blood", "love"]
    rows = [{"prompt": f"The {w} of", "answer": w} for w in words]
    rows += [{"messages": [{"role": "user", "content": f"Say {w}."}], "answer": w} for w in words[:4]]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    (root / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]), "utf-8")
    return {"base": base, "data": root / "prompts.jsonl", "held": root / "held.jsonl"}


REWARDS = '[{kind: regex, pattern: "e"}, {kind: length, target: 8, weight: -0.05}, {kind: exact_match}]'


def grpo_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model={setup['base']}",
        f"data={setup['data']}",
        f"output={out}",
        f"rewards={REWARDS}",
        "group_size=4",
        "global_batch=8",
        "micro_batch=4",
        "max_prompt_len=24",
        "max_new_tokens=12",
        "optim.lr=1e-2",
        "schedule.warmup_steps=0",
        "lora.rank=4",
        "log_every=1",
        "checkpoint.every=0",
        "progress=false",
        "tensorboard=false",
        "threads=1",
        *extra,
    ]


def run_grpo(args: list[str], **trainer_kw: object) -> int:
    from lmforge.config import load_config
    from lmforge.train.grpo import GRPOConfig, train

    return train(load_config(GRPOConfig, None, args), **trainer_kw)  # type: ignore[arg-type]


def test_prompts_plain_and_chat_keep_their_rows(setup: dict[str, Path], tok: Tokenizer) -> None:
    prompts, cut = load_prompts(setup["data"], tok, max_prompt_len=24)
    assert len(prompts) == 12 and cut == 0
    assert prompts[0].text == "The king of" and not prompts[0].chat and prompts[0].row["answer"] == "king"
    assert prompts[8].chat and prompts[8].ids == tok.encode_chat(
        [{"role": "user", "content": "Say king."}], True
    )


def test_cli_run_logs_metrics_and_the_output_loads_with_generate(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.cli import main
    from lmforge.train.metrics import read_metrics

    out = tmp_path / "run"
    args = grpo_args(setup, out, "max_steps=3", f"eval_data={setup['held']}", "beta=0.1")
    assert main(["align", "grpo", *args]) == 0
    rows = read_metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = {"loss", "kl", "clip_fraction", "reward", "reward_std", "reward/regex", "reward/length_std",
            "completion_length", "frac_zero_std", "gen_tokens_per_s", "train_tokens_per_s"}  # fmt: skip
    assert keys <= set(rows[0])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert rows[0]["clip_fraction"] == 0.0  # one pass: ratio 1
    assert rows[-1]["kl"] > 0  # LoRA moved away from the base
    assert 0 < rows[0]["completion_length"] <= 12 + 1
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 3] and {"val_reward", "val_accuracy", "val_reward/regex"} <= set(
        evals[0]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["held_out_prompts"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    gen = [
        "generate",
        f"model={out}",
        "prompt=The king of",
        "sampling.max_tokens=5",
        "sampling.temperature=0",
    ]
    assert main(gen) == 0
    assert capsys.readouterr().out.strip()  # the adapter loaded with its base and generated text
    bad = grpo_args(setup, tmp_path / "bad", "rewards=[{kind: regex}]")
    assert main(["align", "grpo", *bad]) == 2
    err = capsys.readouterr().err
    assert "rewards[0].pattern: missing required key" in err
    assert main(["align", "grpo", *grpo_args(setup, tmp_path / "b2", "global_batch=6", "micro_batch=2")]) == 2
    assert "multiple of group_size" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_mid_rollout_is_bit_exact(setup: dict[str, Path], tmp_path: Path, method: str) -> None:
    """Two passes per rollout; stopped in the second pass of the second rollout (step 3, first micro batch),
    resumed: identical losses and final weights. The sampler's seeds are a function of the step and the
    rollout of the interrupted generation is read back from the run directory."""
    from safetensors.torch import load_file

    from lmforge.train.loop import Interrupted
    from lmforge.train.metrics import read_metrics

    args = ["max_steps=5", "num_iterations=2", "beta=0.05", f"method={method}", "epsilon=0.1"]
    if method == "full":
        args.append("optim.lr=1e-3")
    assert run_grpo(grpo_args(setup, tmp_path / "a", *args)) == 0
    b = tmp_path / "b"
    with pytest.raises(Interrupted):
        run_grpo(grpo_args(setup, b, *args), should_stop=lambda step, micro: step == 3 and micro == 0)
    assert run_grpo(grpo_args(setup, b, *args, "resume=auto")) == 0
    la = {
        r["step"]: (r["loss"], r["clip_fraction"])
        for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    }
    lb = {r["step"]: (r["loss"], r["clip_fraction"]) for r in read_metrics(b / "metrics.jsonl", "train")}
    assert la == lb and len(la) == 5
    assert any(c > 0 for _, c in la.values()) or method == "full"  # second passes move the ratio
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    wa, wb = load_file(str(tmp_path / "a" / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qlora_per_sequence_dr_grpo_without_a_reference(setup: dict[str, Path], tmp_path: Path) -> None:
    """beta 0: no reference, KL exactly 0; loss per sequence: the loop counts completions (8 a step)."""
    from lmforge.train.metrics import read_metrics

    out = tmp_path / "run"
    args = ["max_steps=2", "method=qlora", "beta=0", "loss_type=sequence", "scale_rewards=false"]
    assert run_grpo(grpo_args(setup, out, *args)) == 0
    rows = read_metrics(out / "metrics.jsonl", "train")
    assert [r["tokens"] for r in rows] == [8.0, 8.0] and all(r["kl"] == 0.0 for r in rows)
    assert json.loads((out / "adapter" / "lmforge_base.json").read_text())["method"] == "qlora"
