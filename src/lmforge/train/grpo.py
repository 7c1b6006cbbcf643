"""`lmforge align grpo`: group relative policy optimisation (Shao et al. 2024) with rule-based rewards.

    lmforge align grpo -c configs/rl/grpo-demo.yaml
    lmforge align grpo -c cfg.yaml method=full beta=0 num_iterations=2 --resume auto

Every `num_iterations` optimizer steps a generation: global_batch / group_size prompts (seeded epoch order)
each get `group_size` completions sampled from the current policy by lmforge's KV-cache engine, in batches
of `gen_batch`; the reward functions score them (train/rewards) and advantages are normalised within each
prompt's group. The next `num_iterations` steps are passes over that rollout with the clipped GRPO loss
(train/grpo_loss.py) on the shared loop (train/loop.py). Sampling seeds are a function of (seed,
generation, row), and the rollouts later passes reuse are stored in the run directory, so a resumed run
is bit-identical to an uninterrupted one. The KL reference is the starting model: adapters off for LoRA,
a frozen copy for full; beta=0 needs none.

The run directory gets config.yaml, metrics.jsonl, checkpoints/, report.json (held-out reward before and
after) and model/ (full) or adapter/ (LoRA), which `generate`, `serve`, `eval` and `export` take. Exit
codes: 0 ok, 2 user error (a failing reward function included), 3 integrity, 4 non-finite, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import save_config
from lmforge.data.order import EpochOrder
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.prompting import turn_end_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.io import atomic_write_json, sha256_file
from lmforge.model.hub import pinned
from lmforge.model.integrity import list_checkpoints
from lmforge.model.lora import adapters_disabled
from lmforge.model.source import load_merged_base
from lmforge.train import distributed as D
from lmforge.train.align_configs import GRPOConfig
from lmforge.train.common import parse_single_process, precision_setup
from lmforge.train.grpo_data import (
    Prompt,
    collate_rollout,
    load_prompts,
    load_rollout,
    prune_rollouts,
    save_rollout,
    stop_token,
)
from lmforge.train.grpo_loss import GRPOObjective, group_advantages, token_logps
from lmforge.train.loop import Trainer, settings_from
from lmforge.train.metrics import MetricsLogger, read_metrics
from lmforge.train.objectives import Batch
from lmforge.train.optim import build_optimizer
from lmforge.train.prepare import checkpoint_module, prepare_model
from lmforge.train.rewards import Reward, build_rewards, score
from lmforge.train.rundir import export_result, finish_run_dir, prepare_run_dir

COMMAND = "align grpo"
REPORT = "report.json"
Scope = Callable[[], contextlib.AbstractContextManager[Any]]


CONFIG = GRPOConfig
DESCRIPTION = (
    "Group relative policy optimisation: sample group_size completions per prompt with the KV-cache engine, "
    "score them with weighted reward functions (exact/numeric match, regex, length, Python, unit tests in a "
    "sandbox, a reward model), and train with the clipped, group-normalised GRPO loss and a KL tie to the "
    "starting model; full, LoRA or QLoRA on the shared loop with exact resume. Writes model/ or adapter/ and report.json. Exit codes: 0 ok, 2 user "
    "error, 3 integrity, 4 too many non-finite steps, 130 interrupted."
)
EXAMPLE = "lmforge align grpo -c configs/rl/grpo-demo.yaml"


def check_config(cfg: GRPOConfig, context: int) -> None:
    """What pydantic cannot see alone: batch shapes against group_size and lengths against the context."""
    if cfg.global_batch % cfg.group_size:
        raise ConfigError(
            f"global_batch ({cfg.global_batch}) must be a multiple of group_size ({cfg.group_size})"
        )
    if cfg.max_prompt_len + cfg.max_new_tokens > context:
        raise ConfigError(
            f"max_prompt_len + max_new_tokens ({cfg.max_prompt_len} + {cfg.max_new_tokens}) exceeds the "
            f"context of {cfg.model} ({context})"
        )


def sample_seed(seed: int, generation: int, row: int) -> int:
    """The sampling seed of one completion: a pure function, so nothing but the step needs saving."""
    return int(np.random.SeedSequence([seed, generation, row]).generate_state(1, dtype=np.uint64)[0] >> 2)


class Clock:
    """Seconds spent generating (and scoring) vs training, for tokens/s of each."""

    def __init__(self) -> None:
        self.gen_s = self.train_s = 0.0
        self.gen_tokens = self.train_tokens = 0
        self._since: float | None = None

    def stop(self) -> None:
        if self._since is not None:
            self.train_s += time.perf_counter() - self._since
            self._since = None

    def start(self) -> None:
        self._since = time.perf_counter()


class Rollouts:
    """The loop's BatchSource: step -> micro batches of the generation `step // num_iterations`."""

    def __init__(
        self,
        cfg: GRPOConfig,
        prompts: list[Prompt],
        engine: Engine,
        tok: Any,
        rewards: list[Reward],
        reference: Scope | nn.Module | None,
        autocast: Scope,
        run_dir: Path,
    ) -> None:
        self.cfg, self.prompts, self.engine, self.tok, self.rewards = cfg, prompts, engine, tok, rewards
        self.policy = engine.model
        self.reference, self.autocast, self.run_dir = reference, autocast, run_dir
        self.order = EpochOrder(len(prompts), cfg.seed)
        self.per_step = cfg.global_batch // cfg.group_size
        self.clock = Clock()
        self.key = fingerprint(cfg)
        self._generation: int = -1
        self._batches: list[Batch] = []
        self._stats: dict[str, list[float]] = {}

    def state(self, step: int) -> dict[str, int]:
        return {
            "seed": self.cfg.seed,
            "step": step,
            "global_batch": self.cfg.global_batch,
            "group_size": self.cfg.group_size,
            "num_iterations": self.cfg.num_iterations,
            "prompts": len(self.prompts),
        }

    def micro_batches(self, step: int) -> list[Batch]:
        self.clock.stop()
        g, first_pass = divmod(step, self.cfg.num_iterations)
        if g != self._generation:
            if first_pass == 0:
                self._batches = self._generate(g)
            else:  # resumed between the passes of generation g: the rollout it sampled then
                self._batches = load_rollout(self.run_dir, g, self.key)
            self._generation = g
        self.clock.train_tokens += sum(int((b["labels"] != -100).sum()) for b in self._batches)
        self.clock.start()
        return self._batches

    # -- one generation --------------------------------------------------------------------------------
    def complete(
        self, prompts: list[Prompt], n: int, generation: int | None
    ) -> tuple[list[list[int]], list[str]]:
        """n completions of each prompt, as (token ids ending with the stop token when finished, texts);
        `generation` None = greedy (evaluation)."""
        cfg, requests = self.cfg, []
        for i, p in enumerate(prompts):
            stops = turn_end_ids(self.tok) if p.chat else []
            for j in range(n):
                params = SamplingParams(
                    max_tokens=cfg.max_new_tokens,
                    temperature=0.0 if generation is None else cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=cfg.top_k,
                    stop_token_ids=stops,
                    seed=0 if generation is None else sample_seed(cfg.seed, generation, i * n + j),
                )
                requests.append(GenerationRequest(p.ids, params))
        was_training = self.policy.training
        self.policy.eval()  # no LoRA dropout while sampling
        outs = self.engine.generate(requests)
        self.policy.train(was_training)
        ids = [
            c.token_ids + ([stop_token(self.tok, prompts[k // n].chat)] if c.finish_reason == "stop" else [])
            for k, c in enumerate(outs)
        ]
        return ids, [c.text for c in outs]

    def _generate(self, g: int) -> list[Batch]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        chosen = [self.prompts[int(i)] for i in self.order.batch(g, self.per_step)]
        ids, texts = self.complete(chosen, G, g)
        rows = [p for p in chosen for _ in range(G)]
        totals, per = score(self.rewards, [p.text for p in rows], texts, [p.row for p in rows])
        adv = group_advantages(torch.tensor(totals, dtype=torch.float64), G, cfg.scale_rewards)
        batches = []
        for s in range(0, len(rows), cfg.micro_batch):
            part = slice(s, s + cfg.micro_batch)
            batches.append(
                collate_rollout(
                    [p.ids for p in rows[part]],
                    ids[part],
                    adv[part],
                    self.tok.pad_id,
                    per_sequence=cfg.loss_type == "sequence",
                )
            )
        self._log_logps(batches)
        if cfg.num_iterations > 1:
            save_rollout(self.run_dir, g, batches, self.key)
            done = list_checkpoints(self.run_dir / "checkpoints")
            prune_rollouts(self.run_dir, (done[-1][0] if done else 0) // cfg.num_iterations)
        self.clock.gen_s += time.perf_counter() - t0
        self.clock.gen_tokens += sum(len(x) for x in ids)
        self._record(totals, per, ids)
        return batches

    @torch.no_grad()
    def _log_logps(self, batches: list[Batch]) -> None:
        """old_logps (the sampling policy; only needed for a second pass) and ref_logps (beta > 0)."""
        need_old, ref = self.cfg.num_iterations > 1, self.reference if self.cfg.beta > 0 else None
        if not need_old and ref is None:
            return
        was_training = self.policy.training
        self.policy.eval()
        for b in batches:
            with self.autocast():
                if need_old:
                    b["old_logps"] = token_logps(self.policy, b["input_ids"], b["labels"]).float()
                if isinstance(ref, nn.Module):
                    b["ref_logps"] = token_logps(ref, b["input_ids"], b["labels"]).float()
                elif ref is not None:
                    with ref():
                        b["ref_logps"] = token_logps(self.policy, b["input_ids"], b["labels"]).float()
        self.policy.train(was_training)

    def _record(self, totals: list[float], per: dict[str, list[float]], ids: list[list[int]]) -> None:
        s = self._stats
        s.setdefault("reward", []).extend(totals)
        for name, values in per.items():
            s.setdefault(f"reward/{name}", []).extend(values)
        s.setdefault("completion_length", []).extend(float(len(x)) for x in ids)
        groups = torch.tensor(totals, dtype=torch.float64).view(-1, self.cfg.group_size)
        s.setdefault("zero_std", []).extend(float(x) for x in (groups.std(dim=1) == 0))

    def pop_metrics(self) -> dict[str, Any]:
        """Rollout statistics since the last call (the loop logs them with the step's loss)."""
        self.clock.stop()
        out: dict[str, Any] = {}
        for key, values in self._stats.items():
            t = torch.tensor(values, dtype=torch.float64)
            if key == "zero_std":
                out["frac_zero_std"] = float(t.mean())
            elif key == "completion_length":
                out[key] = float(t.mean())
            else:
                out[key] = float(t.mean())
                out[f"{key}_std"] = float(t.std()) if len(values) > 1 else 0.0
        c = self.clock
        if c.gen_s > 0:
            out["gen_tokens_per_s"] = c.gen_tokens / c.gen_s
        if c.train_s > 0:
            out["train_tokens_per_s"] = c.train_tokens / c.train_s
        self._stats = {}
        self.clock = Clock()
        return out


class RewardEval:
    """Greedy completions of the held-out prompts: mean total reward, each function's mean, accuracy (the
    share whose first reward function scores >= 1, e.g. exact or numeric match)."""

    def __init__(self, source: Rollouts, prompts: list[Prompt]) -> None:
        self.source, self.prompts = source, prompts

    def __call__(self, model: nn.Module, step: int) -> dict[str, Any]:
        src = self.source
        src.clock.stop()  # evaluation time is neither generation nor training time
        _, texts = src.complete(self.prompts, 1, None)
        rows = self.prompts
        totals, per = score(src.rewards, [p.text for p in rows], texts, [p.row for p in rows])
        out: dict[str, Any] = {"val_reward": sum(totals) / len(totals)}
        out.update({f"val_reward/{k}": sum(v) / len(v) for k, v in per.items()})
        first = per[src.rewards[0].name]
        out["val_accuracy"] = sum(v >= 1 for v in first) / len(first)
        out["val_prompts"] = len(rows)
        return out


def fingerprint(cfg: GRPOConfig) -> str:
    """What a stored rollout depends on: data, model, method and every sampling and reward setting."""
    skip = {"output", "resume", "max_steps", "progress", "tensorboard", "wandb_project", "overwrite", "eval"}
    parts = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    parts["data"] = sha256_file(Path(cfg.data))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# -- entry points ------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    return train(parse_single_process(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE))


def reference_of(model: nn.Module, cfg: GRPOConfig) -> Scope | nn.Module | None:
    """The KL reference: none for beta 0, adapters off for LoRA, a frozen copy of the start for full."""
    if cfg.beta == 0:
        return None
    if cfg.method == "full":
        return copy.deepcopy(model).eval().requires_grad_(False)
    return lambda: adapters_disabled(model)


def train(cfg: GRPOConfig, **trainer_kw: Any) -> int:
    """Run the configured GRPO training in this process; returns the exit code (0)."""
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})
    rewards = build_rewards(cfg.rewards)  # bad reward YAML fails before the model loads
    info = D.DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.pick_device(cfg.device, info)
    model, tok, _ = load_merged_base(cfg.model, tokenizer=cfg.tokenizer, device=device, seed=cfg.seed)
    check_config(cfg, int(model.cfg.max_seq_len))
    prompts, cut = load_prompts(cfg.data, tok, max_prompt_len=cfg.max_prompt_len, hf=cfg.hf)
    held = (
        load_prompts(cfg.eval_data, tok, max_prompt_len=cfg.max_prompt_len, hf=cfg.hf)[0]
        if cfg.eval_data
        else []
    )
    held = held[: cfg.eval.max_prompts] if cfg.eval.max_prompts else held
    train_model, summary = prepare_model(
        model, device=device, method=cfg.method, lora=cfg.lora, seed=cfg.seed
    )
    assert summary is not None
    reference = reference_of(model, cfg)
    # Built before the optimizer: the engine may fuse q/k/v (full method), which re-points Parameters.
    engine = Engine(
        model, tok, max_batch_size=cfg.gen_batch, max_seq_len=cfg.max_prompt_len + cfg.max_new_tokens
    )
    model.train()
    prec, _, autocast, scaler = precision_setup(cfg, device)
    run_dir = prepare_run_dir(cfg, info)
    save_config(cfg, run_dir, COMMAND)
    source = Rollouts(cfg, prompts, engine, tok, rewards, reference, autocast, run_dir)
    objective = GRPOObjective(
        beta=cfg.beta,
        eps_low=cfg.epsilon,
        eps_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
        loss_type=cfg.loss_type,
        extra_metrics=source.pop_metrics,
    )
    saved = checkpoint_module(model, cfg.method)
    logger = MetricsLogger(
        run_dir, enabled=True, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
        config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    unit = "tok" if cfg.loss_type == "token" else "completions"
    trainer = Trainer(
        model=saved,
        train_model=train_model,
        optimizer=build_optimizer(saved, cfg.optim),
        batches=source,
        objective=objective,
        settings=settings_from(cfg, name=COMMAND, unit=unit),
        run_dir=run_dir,
        info=info,
        logger=logger,
        evaluator=RewardEval(source, held) if held else None,
        autocast=autocast,
        scaler=scaler,
        extra_state={"config": cfg.model_dump(mode="json"), "precision": prec, "method": cfg.method},
        **trainer_kw,
    )
    trainer.resume_and_say(cfg.resume)
    print(
        f"align grpo ({cfg.method}, G={cfg.group_size}, beta {cfg.beta}, {cfg.num_iterations} pass(es) per "
        f"rollout, loss per {cfg.loss_type}): {summary['trainable']:,} of {summary['total']:,} parameters "
        f"trainable; {len(prompts):,} prompts ({cut} cut to {cfg.max_prompt_len} tokens), {len(held):,} "
        f"held out; rewards {', '.join(r.name for r in rewards)}; {prec} on {device}",
        file=sys.stderr,
    )
    try:
        state = trainer.run()
    finally:
        logger.close()
    ckpt = run_dir / "checkpoints" / f"step-{state.model_step:06d}"
    out = export_result(run_dir, ckpt, model, tok, cfg.method, cfg.lora, cfg.model)
    _write_report(cfg, run_dir, state.step, summary, len(prompts), len(held))
    finish_run_dir(run_dir, Path(cfg.output), COMMAND)
    print(f"wrote {cfg.output} ({out.name}/, step {state.step})")
    return 0


def _write_report(
    cfg: GRPOConfig, run_dir: Path, steps: int, summary: dict[str, Any], n_prompts: int, n_held: int
) -> None:
    """report.json: settings, counts, the last training rewards and held-out numbers before and after."""
    report: dict[str, Any] = {
        "method": cfg.method,
        "beta": cfg.beta,
        "group_size": cfg.group_size,
        "trainable": summary,
        "prompts": n_prompts,
        "held_out_prompts": n_held,
        "steps": steps,
    }
    train_rows = [r for r in read_metrics(run_dir / "metrics.jsonl", "train") if "reward" in r]
    if train_rows:
        report["train_reward"] = {"first": train_rows[0]["reward"], "last": train_rows[-1]["reward"]}
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    if evals:
        first, last = evals[0], evals[-1]
        report["before"], report["after"] = _held_out(first), _held_out(last)
        print(
            f"held-out: reward {first['val_reward']:.3f} -> {last['val_reward']:.3f}, accuracy "
            f"{first['val_accuracy']:.1%} -> {last['val_accuracy']:.1%} (step {first['step']} -> {last['step']})"
        )
    atomic_write_json(run_dir / REPORT, report)


def _held_out(record: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_") or k == "step"}


__all__ = ["CONFIG", "GRPOConfig", "Rollouts", "main", "train"]
