"""GRPO on this CPU: `lmforge align grpo` against TRL's `GRPOTrainer`, on the RL demo's addition task.

    .venv/bin/python -m benchmarks.grpo_trl                       # after `make demo-rl` (its SFT model and data)
    .venv/bin/python -m benchmarks.grpo_trl --steps 40 --reps 1

One model for both: the demo's SFT model (runs/demo-rl/sft: the `tiny` Llama, 0.77M parameters, byte
tokenizer), which lmforge loads as it is and TRL as the `LlamaForCausalLM` that `lmforge export hf` writes
from it (the export checks logit parity). Same data: runs/demo-rl/data/prompts.jsonl (plain "a+b=" prompts
with an `answer` field). Same settings: G = 8 completions per prompt, 128 completions (16 prompts) per
optimizer step, at most 5 new tokens, temperature 1, beta 0 (no reference model), one pass per rollout
(ratio 1), clip 0.2, loss normalised per completion token over the batch (TRL `loss_type=dapo`), advantages
scaled by the group's std, exact-match reward on `answer`, AdamW lr 2e-4 (betas 0.9, 0.95) constant after 5
warmup steps, no weight decay, clip-norm 1.0, fp32, 1 thread.

Each contender runs in its own process, one after the other, alternating for `--reps` rounds. A thread in
each process samples (wall, process CPU) every 0.2 s, so every optimizer step gets its process CPU time;
"at equal CPU time" compares the training reward of both when the cheaper run has used all its CPU
seconds (the dearer one has done fewer steps by then). Generation tokens/s: completion tokens over the seconds spent sampling (lmforge: its engine,
from the run's metrics; TRL: `model.generate`, timed by wrapping it). Held-out: greedy exact match on the
first 200 held-out prompts after training. Output: a table and benchmarks/results/grpo_trl.json.
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"G": 8, "completions_per_step": 128, "max_new_tokens": 5, "lr": 2e-4, "warmup": 5, "beta": 0.0}
HELD = 200


class CpuClock(threading.Thread):
    """(wall, process CPU) samples; `cpu_at(wall)` interpolates between them."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = [(time.time(), time.process_time())]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.samples.append((time.time(), time.process_time()))

    def cpu_at(self, wall: float) -> float:
        s = self.samples
        for (w0, c0), (w1, c1) in itertools.pairwise(s):
            if w0 <= wall <= w1:
                return c0 + (c1 - c0) * (wall - w0) / max(w1 - w0, 1e-9)
        return s[-1][1] if wall > s[-1][0] else s[0][1]


# -- lmforge ------------------------------------------------------------------------------------------
def run_lmforge(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmforge.config import load_config
    from lmforge.train.grpo import CONFIG, train

    torch.set_num_threads(1)
    overrides = [
        f"model={a.sft}",
        f"data={a.data}/prompts.jsonl",
        f"eval_data={a.data}/heldout.jsonl",
        f"output={a.out}/run",
        f"max_steps={a.steps}",
        f"eval.max_prompts={HELD}",
        "eval.every=0",
        "progress=false",
        "overwrite=true",
        f"group_size={SETTINGS['G']}",
        f"global_batch={SETTINGS['completions_per_step']}",
        f"micro_batch={SETTINGS['completions_per_step']}",
        f"max_new_tokens={SETTINGS['max_new_tokens']}",
        f"optim.lr={SETTINGS['lr']}",
        "optim.beta2=0.95",
        "optim.weight_decay=0",
        "schedule.kind=constant",
        f"schedule.warmup_steps={SETTINGS['warmup']}",
        f"beta={SETTINGS['beta']}",
        "num_iterations=1",
        "log_every=1",
        "threads=1",
    ]
    cfg = load_config(CONFIG, ROOT / "configs" / "demo-rl" / "grpo.yaml", overrides, command="align grpo")
    clock = CpuClock()
    clock.start()
    t0, c0 = time.time(), time.process_time()
    train(cfg)
    wall, cpu = time.time() - t0, time.process_time() - c0
    clock.done.set()
    rows = [json.loads(x) for x in (Path(a.out) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    gen_tps = [r["gen_tokens_per_s"] for r in steps if "gen_tokens_per_s" in r]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "curve": [
            {"step": r["step"], "reward": r["reward"], "cpu_s": clock.cpu_at(r["time"]) - c0} for r in steps
        ],
        "gen_tokens_per_s": statistics.median(gen_tps) if gen_tps else None,
        "held_out_before": evals[0]["val_accuracy"] if evals else None,
        "held_out_after": evals[-1]["val_accuracy"] if evals else None,
    }


# -- TRL ----------------------------------------------------------------------------------------------
def _reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]


def _timed_generate(model: Any, eos: int, stats: dict[str, float]) -> None:
    """Wrap `model.generate`: seconds spent in it and completion tokens (to the first EOS) it made."""
    import torch

    inner = model.generate

    def generate(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        stats["seconds"] += time.perf_counter() - t0
        new = out[:, kw["input_ids"].shape[1] :]
        is_eos = new == eos
        first = torch.where(
            is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1])
        )
        stats["tokens"] += float(first.sum())
        return out

    model.generate = generate


def _held_out_trl(model: Any, tok: Any, path: Path) -> float:
    import torch

    rows = [json.loads(x) for x in path.read_text().splitlines()][:HELD]
    tok.padding_side = "left"
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            part = rows[i : i + 64]
            enc = tok(
                [r["prompt"] for r in part], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = model.generate(**enc, max_new_tokens=SETTINGS["max_new_tokens"], do_sample=False)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(t.strip() == r["answer"] for t, r in zip(texts, part, strict=True))
    return hits / len(rows)


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(a.hf)
    model = LlamaForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    rows = [json.loads(x) for x in (Path(a.data) / "prompts.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    held_before = _held_out_trl(model, tok, Path(a.data) / "heldout.jsonl")
    args = GRPOConfig(
        output_dir=str(Path(a.out) / "trl"),
        per_device_train_batch_size=SETTINGS["completions_per_step"],
        gradient_accumulation_steps=1,
        num_generations=SETTINGS["G"],
        max_completion_length=SETTINGS["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=SETTINGS["beta"],
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=SETTINGS["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=SETTINGS["warmup"],
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    curve: list[dict[str, float]] = []
    clock = CpuClock()
    t_start = {"cpu": 0.0}

    class Log(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                curve.append(
                    {
                        "step": state.global_step,
                        "reward": logs["reward"],
                        "cpu_s": time.process_time() - t_start["cpu"],
                    }
                )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=_reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Log()],
    )
    gen = {"seconds": 0.0, "tokens": 0.0}
    _timed_generate(trainer.model, int(tok.eos_token_id), gen)
    clock.start()
    t0, t_start["cpu"] = time.time(), time.process_time()
    trainer.train()
    wall, cpu = time.time() - t0, time.process_time() - t_start["cpu"]
    clock.done.set()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "curve": curve,
        "gen_tokens_per_s": gen["tokens"] / gen["seconds"] if gen["seconds"] else None,
        "held_out_before": held_before,
        "held_out_after": _held_out_trl(trainer.model, tok, Path(a.data) / "heldout.jsonl"),
    }


# -- driver -------------------------------------------------------------------------------------------
def _per_step_cpu(curve: list[dict[str, float]]) -> float:
    """Median CPU seconds per step, steps after the first 3 (startup and first-call costs left out)."""
    d = [b["cpu_s"] - a["cpu_s"] for a, b in itertools.pairwise(curve)][3:]
    return statistics.median(d) if d else float("nan")


def _reward_at(curve: list[dict[str, float]], key: str, value: float, window: int = 5) -> float:
    """Mean training reward of the `window` logged steps up to where `key` reaches `value`."""
    upto = [r for r in curve if r[key] <= value] or curve[:1]
    return statistics.mean(r["reward"] for r in upto[-window:])


def _worker(a: argparse.Namespace) -> int:
    result = run_lmforge(a) if a.worker == "lmforge" else run_trl(a)
    Path(a.result).write_text(json.dumps(result))
    return 0


def _spawn(name: str, a: argparse.Namespace, tmp: Path, hf: Path, rep: int) -> dict[str, Any]:
    out = tmp / f"{name}-{rep}"
    res = tmp / f"{name}-{rep}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.grpo_trl",
        "--worker",
        name,
        "--sft",
        str(a.sft),
        "--hf",
        str(hf),
    ]
    cmd += ["--data", str(a.data), "--steps", str(a.steps), "--out", str(out), "--result", str(res)]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        "OMP_NUM_THREADS": "1",
        "LMFORGE_PROGRESS_INTERVAL": "60",
    }
    print(f"[{name} round {rep}] running {a.steps} steps ...", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return dict(json.loads(res.read_text()))


def _from_first_step(curve: list[dict[str, float]]) -> list[dict[str, float]]:
    """CPU seconds counted from the end of step 1: loading, the held-out pass and first-call costs left out."""
    c0 = curve[0]["cpu_s"]
    return [{**c, "cpu_s": c["cpu_s"] - c0} for c in curve]


def summarise(runs: dict[str, list[dict[str, Any]]], steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rs in runs.values():
        for r in rs:
            r["curve"] = _from_first_step(r["curve"])
    for name, rs in runs.items():
        per = statistics.median(_per_step_cpu(r["curve"]) for r in rs)
        out[name] = {
            "cpu_s_per_step": per,
            "steps_per_cpu_hour": 3600 / per,
            "run_wall_s": statistics.median(r["wall_s"] for r in rs),
            "run_cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] or 0 for r in rs),
            "reward_first_5_steps": statistics.mean(_reward_at(r["curve"], "step", 5) for r in rs),
            "reward_last_5_steps": statistics.mean(_reward_at(r["curve"], "step", steps) for r in rs),
            "held_out_before": rs[0]["held_out_before"],
            "held_out_after": statistics.mean(r["held_out_after"] for r in rs),
        }
    # at equal CPU time: where the faster one stands when the slower one finished its last step
    budget = min(max(c["cpu_s"] for c in r["curve"]) for rs in runs.values() for r in rs)
    for name, rs in runs.items():
        out[name]["reward_at_equal_cpu"] = statistics.mean(
            _reward_at(r["curve"], "cpu_s", budget) for r in rs
        )
        out[name]["steps_at_equal_cpu"] = statistics.median(
            max(c["step"] for c in r["curve"] if c["cpu_s"] <= budget) for r in rs
        )
    out["equal_cpu_budget_s"] = budget
    lm, trl = out["lmforge"], out["trl"]
    out["ratios"] = {
        "steps_per_hour": lm["steps_per_cpu_hour"] / trl["steps_per_cpu_hour"],
        "gen_tokens_per_s": lm["gen_tokens_per_s"] / max(trl["gen_tokens_per_s"], 1e-9),
    }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, default=ROOT / "runs" / "demo-rl" / "sft", help="lmforge SFT model")
    p.add_argument(
        "--data", type=Path, default=ROOT / "runs" / "demo-rl" / "data", help="`data arith` output"
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_trl.json")
    p.add_argument("--worker", choices=["lmforge", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return _worker(a)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as t:
        tmp = Path(t)
        hf = tmp / "hf"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(
            [sys.executable, "-m", "lmforge", "export", "hf", str(a.sft), f"output={hf}"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        runs: dict[str, list[dict[str, Any]]] = {"lmforge": [], "trl": []}
        for rep in range(a.reps):
            for name in ("lmforge", "trl") if rep % 2 == 0 else ("trl", "lmforge"):
                runs[name].append(_spawn(name, a, tmp, hf, rep))
    summary = summarise(runs, a.steps)
    result = {
        "benchmark": "grpo_trl",
        "settings": {**SETTINGS, "steps": a.steps, "reps": a.reps, "held_out_prompts": HELD, "threads": 1},
        "summary": summary,
        "runs": runs,
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    lm, trl = summary["lmforge"], summary["trl"]
    print("| | lmforge | TRL | ratio |\n|---|---:|---:|---:|")
    print(
        f"| steps per CPU hour | {lm['steps_per_cpu_hour']:.0f} | {trl['steps_per_cpu_hour']:.0f} | {summary['ratios']['steps_per_hour']:.2f}x |"
    )
    print(
        f"| generation tokens/s | {lm['gen_tokens_per_s']:.0f} | {trl['gen_tokens_per_s']:.0f} | {summary['ratios']['gen_tokens_per_s']:.2f}x |"
    )
    for k in (
        "reward_first_5_steps",
        "reward_last_5_steps",
        "reward_at_equal_cpu",
        "steps_at_equal_cpu",
        "held_out_before",
        "held_out_after",
    ):
        print(f"| {k} | {lm[k]:.3f} | {trl[k]:.3f} | |")
    print(f"wrote {a.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {k: version(k) for k in ("torch", "transformers", "trl")}


if __name__ == "__main__":
    raise SystemExit(main())
