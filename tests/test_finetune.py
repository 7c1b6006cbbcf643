"""`lmforge finetune` end to end on a task with one right answer, exact resume, LoRA checkpoints, errors.

The task: a prompt of a letter and a digit ("k7"); the answer is a letter in upper case. Task 0 answers
the same letter ("K"), task 1 the next one ("L"). A 116K-parameter Llama learns task 0 from random weights
(full fine-tuning); LoRA and QLoRA then teach that model task 1, which it gets 0% right before. Held-out
prompts are letter/digit pairs never trained on. Measured on 2 busy cores with 1 thread: full 400 steps
~25 s (exact match 0% -> 100% by step 400), LoRA / QLoRA 120 steps ~15 s (0% -> 100% by step 100).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.data.manifest import verify_manifest
from lmforge.errors import LmforgeError
from lmforge.tokenizer import SpecialTokensConfig, Tokenizer, load_tokenizer, train_tokenizer
from lmforge.train.finetune import CONFIG, train
from lmforge.train.metrics import read_metrics

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SMALL = "{n_layers: 2, dim: 64, n_heads: 4, n_kv_heads: 4, hidden_dim: 172}"
COMMON = [
    "seq_len=64",
    "global_batch=32",
    "micro_batch=32",
    "threads=1",  # 2 threads on 2 shared cores are many times slower than 1
    "log_every=10",
    "progress=false",
    "tensorboard=false",
    "schedule.warmup_steps=5",
]


def answer(prompt: str, shift: int) -> str:
    return LETTERS[(LETTERS.index(prompt[0]) + shift) % 26].upper()


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("task")
    special = SpecialTokensConfig()
    # No merges: one token per character (the answer is 1 token + <|im_end|>).
    train_tokenizer(["x"], vocab_size=len(special.ordered()) + 256, special_tokens=special).save(d / "tok")
    prompts = [a + b for a in LETTERS for b in "0123456789"]
    random.Random(0).shuffle(prompts)
    for shift in (0, 1):
        for split, chosen in (("train", prompts[:200]), ("val", prompts[200:])):
            lines = [json.dumps({"prompt": p, "completion": answer(p, shift)}) for p in chosen]
            (d / f"{split}{shift}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def data_args(task: Path, shift: int) -> list[str]:
    return [f"data.train={task / f'train{shift}.jsonl'}", f"data.val={task / f'val{shift}.jsonl'}"]


@pytest.fixture(scope="module")
def base(task: Path) -> Path:
    """Task 0 learned from random weights by full fine-tuning through the CLI."""
    out = task / "full"
    rc = main(
        [
            "finetune",
            "base=tiny",
            f"tokenizer={task / 'tok'}",
            f"model_overrides={SMALL}",
            "method=full",
            "data.packing=false",
            "optim.lr=5e-3",
            "max_steps=400",
            "eval.every=100",
            f"output={out}",
            *COMMON,
            *data_args(task, 0),
        ]
    )
    assert rc == 0
    return out


def summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, tok: Tokenizer, val: Path, shift: int) -> float:
    """Real greedy decoding of each held-out prompt (KV cache), compared with 'answer<|im_end|>'."""
    from lmforge.model.transformer import generate_greedy

    prompts = [json.loads(line)["prompt"] for line in val.read_text().splitlines()]
    ids = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in prompts
    ]
    out = generate_greedy(model.eval(), torch.tensor(ids), max_new_tokens=2)[:, -2:]  # type: ignore[arg-type]
    want = torch.tensor([tok.encode(answer(p, shift) + "<|im_end|>") for p in prompts])
    return float((out == want).all(dim=1).float().mean())


def test_full_finetune_learns_the_task_and_writes_a_servable_model(base: Path, task: Path) -> None:
    from lmforge.model.source import load_model

    s = summary(base)
    assert s["trainable"]["fraction"] == 1.0 and s["trainable"]["trainable"] == 115_840
    assert s["val_before"]["val_exact_match"] <= 0.05
    assert s["val_after"]["val_exact_match"] >= 0.9  # measured 1.0
    assert s["val_after"]["val_loss"] < 0.5 < 5.0 < s["val_before"]["val_loss"]  # measured 5.56 -> 0.31
    assert s["data"]["train_examples"] == 200 and s["data"]["val_examples"] == 60
    evals = read_metrics(base / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 100, 200, 300, 400]
    verify_manifest(base)
    # model/ alone serves generate/chat/eval: it loads with its tokenizer and decodes the answers greedily.
    model, tok = load_model(base / "model")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_start|>user\na<|im_end|>\n"
    assert greedy_accuracy(model, tok, task / "val0.jsonl", 0) >= 0.9


def lora_run(task: Path, base: Path, method: str, out: Path, steps: int = 120, *extra: str) -> Path:
    rc = main(
        [
            "finetune",
            f"base={base / 'model'}",
            f"method={method}",
            "optim.lr=1e-2",
            f"max_steps={steps}",
            "eval.every=40",
            f"output={out}",
            *COMMON,
            *data_args(task, 1),
            *extra,
        ]
    )
    assert rc == 0
    return out


def test_lora_teaches_the_base_a_new_task(base: Path, task: Path) -> None:
    from lmforge.model.lora import load_adapter
    from lmforge.model.source import load_model

    run = lora_run(task, base, "lora", task / "lora")
    s = summary(run)
    assert s["trainable"]["trainable"] == 2 * 8 * (
        4 * (64 + 64) + 3 * (64 + 172)
    )  # rank 8, 7 targets, 2 layers
    assert 0.13 < s["trainable"]["fraction"] < 0.16
    assert s["val_before"]["val_exact_match"] <= 0.05  # the base answers "K" for "k7"
    assert s["val_after"]["val_exact_match"] >= 0.9  # measured 1.0
    assert not (run / "model").exists()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str((base / "model").resolve())
    # The LoRA checkpoints hold only adapter tensors (and their optimizer state).
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert len(weights) == 2 * 7 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in weights)
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[0] for k in moments} == set(weights)
    # The saved adapter on a freshly loaded base reproduces the answers by real greedy decoding.
    model, tok = load_model(base / "model")
    assert greedy_accuracy(model, tok, task / "val1.jsonl", 1) == 0.0
    load_adapter(model, run / "adapter")
    assert greedy_accuracy(model, tok, task / "val1.jsonl", 1) >= 0.9


@pytest.mark.slow
def test_qlora_teaches_the_base_a_new_task(base: Path, task: Path) -> None:
    run = lora_run(task, base, "qlora", task / "qlora")
    s = summary(run)
    assert s["val_before"]["val_exact_match"] <= 0.05
    assert s["val_after"]["val_exact_match"] >= 0.9  # measured 1.0 (0.95 at step 100)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def resume_cfg(task: Path, out: Path, method: str, **kw: Any) -> Any:
    """Packed rows, accumulation over 2 micro batches and dropout (LoRA), so every RNG and position matters."""
    fields: dict[str, Any] = {
        "base": "tiny",
        "tokenizer": str(task / "tok"),
        "model_overrides": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 4, "hidden_dim": 172},
        "output": str(out),
        "data": {"train": [str(task / "train1.jsonl")], "val": [str(task / "val1.jsonl")], "packing": True},
        "method": method,
        "lora": {"dropout": 0.1, "rank": 4},
        "seq_len": 64,
        "global_batch": 8,
        "micro_batch": 4,
        "max_steps": 8,
        "threads": 1,
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "eval": {"every": 4},
        "checkpoint": {"every": 3, "keep": 0},
        "progress": False,
        "tensorboard": False,
        "log_every": 1,
        **kw,
    }
    return CONFIG.model_validate(fields)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_and_resumed_equals_uninterrupted(task: Path, tmp_path: Path, method: str) -> None:
    assert train(resume_cfg(task, tmp_path / "straight", method)) == 0
    cut = resume_cfg(task, tmp_path / "cut", method)
    with pytest.raises(LmforgeError) as e:
        train(cut, should_stop=lambda step, micro: step == 5 and micro == 0)  # mid-accumulation
    assert e.value.exit_code == 130
    assert train(cut.model_copy(update={"resume": "auto"})) == 0
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "cut" / name))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", "train")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl", "train")}
    assert la == lb and len(la) == 8


def test_activation_checkpointing_trains_the_same_adapter(task: Path, tmp_path: Path) -> None:
    """Recomputing blocks in backward (LoRA dropout included: checkpoint restores the RNG) changes
    nothing but memory."""
    short = {"max_steps": 3, "checkpoint": {"every": 0, "keep": 0}, "eval": {"every": 0}}
    assert train(resume_cfg(task, tmp_path / "plain", "lora", **short)) == 0
    ckpt = resume_cfg(task, tmp_path / "ckpt", "lora", activation_checkpointing=True, **short)
    assert train(ckpt) == 0
    name = "adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "ckpt" / name))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_hf_folder_base_with_qlora(tmp_path: Path, task: Path) -> None:
    """An HF Llama folder as the base; the adapter records the folder and the tokenizer is copied."""
    from infer_helpers import make_tokenizer, save_hf_model

    tok = make_tokenizer()
    save_hf_model("llama", tok, tmp_path / "hf")
    out = tmp_path / "run"
    args = [
        "base=" + str(tmp_path / "hf"),
        "method=qlora",
        "max_steps=3",
        f"output={out}",
        "data.val_fraction=0.1",
    ]
    assert main(["finetune", *args, *COMMON, f"data.train={task / 'train1.jsonl'}"]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert load_tokenizer(out / "adapter").vocab_size == tok.vocab_size
    assert summary(out)["data"]["val_examples"] > 0


def test_user_errors_are_one_line(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "B"}\n{"prompt": "a"}\n')
    out = str(tmp_path / "o")
    assert (
        main(["finetune", "base=tiny", f"tokenizer={task / 'tok'}", f"data.train={bad}", f"output={out}"])
        == 2
    )
    assert f"{bad}:2: prompt_completion record without ['completion']" in capsys.readouterr().err
    assert main(["finetune", "base=tiny", f"data.train={bad}", f"output={out}"]) == 2
    assert "tokenizer: a preset base ('tiny') needs a tokenizer folder" in capsys.readouterr().err
    assert main(["finetune", "base=tiny", "method=dora", f"data.train={bad}", f"output={out}"]) == 2
    assert "method" in capsys.readouterr().err
    assert not Path(out).exists()


def test_an_adapter_is_not_a_base(base: Path, task: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = task / "lora"  # written by test_lora_teaches_the_base_a_new_task, else made here
    if not run.exists():
        lora_run(task, base, "lora", run, 2)
    assert (
        main(["finetune", f"base={run}", f"data.train={task / 'train1.jsonl'}", f"output={task / 'x'}"]) == 2
    )
    assert "is a LoRA adapter, not a model" in capsys.readouterr().err


def test_seq_len_past_the_base_context_is_capped_with_a_notice(
    tmp_path: Path, task: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder base has its own context (128 here): seq_len=512 trains at 128 and says so on one line."""
    from infer_helpers import make_tokenizer, save_hf_model
    from lmforge.config import load_config
    from lmforge.train.configs import FinetuneConfig

    save_hf_model("llama", make_tokenizer(), tmp_path / "hf")
    out = tmp_path / "run"
    args = [f"base={tmp_path / 'hf'}", "method=lora", "max_steps=1", f"output={out}", "data.val_fraction=0.1"]
    assert main(["finetune", *args, *COMMON, "seq_len=512", f"data.train={task / 'train1.jsonl'}"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert notices == [
        f"notice: seq_len=512 exceeds the context of {tmp_path / 'hf'} (128); using seq_len=128"
    ]
    assert load_config(FinetuneConfig, out / "config.yaml").seq_len == 128
