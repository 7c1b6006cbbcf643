"""What a sweep writes: results.md / results.csv, sweep.json, best.yaml and the PNG plots.

    write_results(cfg, study, base, plots=True)

`best.yaml` is the best trial's full config (base + fixed overrides + its params) writing to
`<output>/best`, so `lmforge <command> -c <output>/best.yaml` reruns it as is. Trial-steps are the optimizer
steps the trials trained; without pruning every trial would have run its `max_steps`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.sweep.config import SweepConfig, trial_config, write_yaml
from lmforge.sweep.study import SURPLUS

if TYPE_CHECKING:
    import optuna


def rows(study: optuna.Study) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if SURPLUS in a:
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        out.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "last_eval": last,
                "steps": a.get("steps"),
                "max_steps": a.get("max_steps"),
                "seconds": a.get("seconds"),
                "params": dict(t.params),
                "error": a.get("error", ""),
            }
        )
    return out


def summary(cfg: SweepConfig, table: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in table if r["state"] in ("complete", "pruned", "fail")]
    complete = [r for r in table if r["state"] == "complete" and r["value"] is not None]
    run = sum(int(r["steps"] or 0) for r in done)
    full = sum(int(r["max_steps"] or r["steps"] or 0) for r in done)
    best = None
    if complete:
        pick = min if cfg.objective.direction == "minimize" else max
        b = pick(complete, key=lambda r: r["value"])
        best = {"trial": b["trial"], "value": b["value"], "params": b["params"]}
    counts = {s: sum(r["state"] == s for r in table) for s in ("complete", "pruned", "fail", "running")}
    return {
        "study": cfg.name(),
        "metric": cfg.objective.metric,
        "direction": cfg.objective.direction,
        "trials": len(table),
        "states": counts,
        "best": best,
        "trial_steps": run,
        "trial_steps_without_pruning": full,
        "steps_saved": 0.0 if not full else round(1 - run / full, 4),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def tables(cfg: SweepConfig, table: list[dict[str, Any]]) -> tuple[str, str]:
    """(markdown, csv) of every trial: state, objective, steps, time, params, error."""
    keys = list(cfg.params)
    head = ["trial", "state", cfg.objective.metric, "steps", "max_steps", "seconds", *keys, "error"]
    body = [
        [
            r["trial"],
            r["state"],
            r["value"] if r["state"] == "complete" else r["last_eval"],
            r["steps"],
            r["max_steps"],
            r["seconds"],
            *[r["params"].get(k) for k in keys],
            r["error"],
        ]
        for r in table
    ]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in body]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([[_fmt(c) for c in row] for row in body])
    return "\n".join(md) + "\n", buf.getvalue()


def write_results(
    cfg: SweepConfig, study: optuna.Study, base: dict[str, Any], *, plots: bool
) -> dict[str, Any]:
    out = Path(cfg.output)
    table = rows(study)
    info = summary(cfg, table)
    md, text = tables(cfg, table)
    best = info["best"]
    lead = f"# Sweep {cfg.name()}: `lmforge {cfg.train.command}` over {', '.join(cfg.params)}\n\n"
    if best is not None:
        lead += f"Best: trial {best['trial']}, {cfg.objective.metric} {best['value']:.6g} ({cfg.objective.direction}).\n"
    lead += (
        f"Trial-steps run: {info['trial_steps']:,} of {info['trial_steps_without_pruning']:,} without "
        f"pruning ({info['steps_saved']:.1%} saved).\n\n"
    )
    atomic_write_text(out / "results.md", lead + md)
    atomic_write_text(out / "results.csv", text)
    atomic_write_json(out / "sweep.json", info)
    if best is not None:
        tree = trial_config(cfg, base, best["params"], out / "best")
        header = (
            f"# lmforge {cfg.train.command} -c {out / 'best.yaml'}\n"
            f"# The best trial ({best['trial']}) of sweep {cfg.name()!r}: {cfg.objective.metric} "
            f"{best['value']:.6g}; {cfg.train.config} with the sweep's fixed overrides and these params.\n"
        )
        write_yaml(out / "best.yaml", tree, header)
    if plots:
        plot(cfg, study, table, out)
    return info


def plot(cfg: SweepConfig, study: optuna.Study, table: list[dict[str, Any]], out: Path) -> list[str]:
    """objective.png (each trial's value, pruned ones at their last evaluation, and the best so far) and
    importance.png (Optuna's fANOVA parameter importances); returns what was skipped and why."""
    skipped: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots: matplotlib is not installed (pip install 'lmforge[sweep]')"]
    metric, minimize = cfg.objective.metric, cfg.objective.direction == "minimize"
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:orange")):
        pts = [(r["trial"], r["value"] if state == "complete" else r["last_eval"]) for r in table]
        pts = [(n, v) for (n, v), r in zip(pts, table, strict=True) if r["state"] == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=state)
    best, line = math.inf if minimize else -math.inf, []
    for r in table:
        if r["state"] == "complete" and r["value"] is not None:
            best = min(best, r["value"]) if minimize else max(best, r["value"])
        line.append((r["trial"], best if math.isfinite(best) else None))
    line = [(n, v) for n, v in line if v is not None]
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{cfg.name()}: {metric} by trial")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "objective.png", dpi=100)
    plt.close(fig)
    try:
        import optuna

        importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:  # fewer than two finished trials, or no parameter varied
        return [*skipped, f"importance.png: {e}"]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (fANOVA)")
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=100)
    plt.close(fig)
    return skipped
