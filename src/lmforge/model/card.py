"""Model cards: the README.md, in the Hugging Face model-card format, of every model folder lmforge writes.

    write_card(run / "model", stage=run, kind="finetune", mcfg=cfg)          # a training run's final model
    write_card(out, stage=out, kind="export", mcfg=model.cfg, library="transformers", tags=["hf"])

The card is YAML front matter (license, base_model, datasets as sha256s of the inputs' manifests, tags,
library_name, pipeline_tag) and sections: model details, how it was made (the resolved config.yaml of this
stage and of the training run it comes from), data provenance (every input with its manifest hash, and the
chain of stages back to the first model), evaluation (summary.json, the last eval of metrics.jsonl,
quant_report.json), parity (parity.json) and intended use. Everything is read from files the stages already
write next to the model, so a card says nothing its folder cannot prove. Written before the folder's
manifest, so the manifest covers it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text, sha256_file
from lmforge.model.config import ModelConfig, num_params
from lmforge.model.hub import is_hub_id, snapshot, split_id

CARD = "README.md"
MANIFEST = "manifest.json"
RUN_CONFIG = "config.yaml"
SOURCE_KEYS = ("base", "model", "adapter")  # config keys naming the model a stage started from
SKIP_KEYS = ("output", "resume", "command")
TRAINING = ("pretrain", "finetune", "align dpo")


def model_name(spec: str | Path) -> str:
    """A model's name for cards and GGUF `general.name`: a hub id's NAME, else the run's folder name (above
    model/, adapter/ or checkpoints/step-N/), never a generic 'model'."""
    if is_hub_id(spec):
        return split_id(str(spec))[0].split("/", 1)[1]
    p = Path(spec).resolve()
    while p.parent != p and _inner(p):
        p = p.parent
    return p.name.removesuffix(".partial") or "lmforge-model"  # a run being written is <output>.partial


def _inner(p: Path) -> bool:
    """A folder inside a run: its model/, adapter/, checkpoints/ or one checkpoint."""
    return p.name in ("model", "adapter", "checkpoints") or p.name.startswith("step-")


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8")) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none)."""
    text = path.read_text("utf-8") if path.is_file() else ""
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---\n", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def digest(value: str) -> str | None:
    """sha256 of an input: a folder's manifest.json, a file itself; a hub id is its pinned revision."""
    p = Path(value)
    if p.is_dir():
        for cand in (p / MANIFEST, p.parent / MANIFEST):
            if cand.is_file():
                return f"sha256:{sha256_file(cand)}"
        return None
    return f"sha256:{sha256_file(p)}" if p.is_file() else None


def inputs(config: dict[str, Any], prefix: str = "") -> list[tuple[str, str, str | None]]:
    """(config key, value, sha256) for every config value naming an existing file, folder or a hub id."""
    out: list[tuple[str, str, str | None]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += inputs(value, f"{name}.")
            continue
        for item in value if isinstance(value, list) else [value]:  # data.train: one file or several
            if not isinstance(item, str) or key in SKIP_KEYS or not item:
                continue
            if is_hub_id(item) and key in SOURCE_KEYS:
                out.append((name, item, None))
            elif Path(item).exists():
                out.append((name, item, digest(item)))
    return out


def _run_of(spec: str) -> Path | None:
    """The stage folder holding config.yaml for a model path (the path, or the run above model/...)."""
    p = Path(spec)
    while not (p / RUN_CONFIG).is_file():
        if p.parent == p or not _inner(p):
            return None
        p = p.parent
    return p


def chain(config: dict[str, Any], limit: int = 12) -> list[dict[str, Any]]:
    """The stages a model comes from: this config's source, its source's source ... back to a preset,
    an HF folder or a hub id. Each: {command, source, sha256, config (that stage's config.yaml)}."""
    out: list[dict[str, Any]] = []
    cfg = config
    for _ in range(limit):
        source = next((cfg[k] for k in SOURCE_KEYS if isinstance(cfg.get(k), str)), None)
        if source is None:
            break
        run = None if is_hub_id(source) else _run_of(source)
        upstream = _yaml(run / RUN_CONFIG) if run is not None else {}
        sha = None if is_hub_id(source) else digest(source)
        out.append({"command": upstream.get("command"), "source": source, "sha256": sha, "config": upstream})
        if not upstream or source == upstream.get("base") or source == upstream.get("model"):
            break
        cfg = upstream
    return out


def _base_model(origin: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(base model, its revision): the first model of the chain (a hub id's repo, else its path)."""
    for step in reversed(origin):
        src = str(step["source"])
        if is_hub_id(src):
            return split_id(src)
        if Path(src).is_dir():
            return str(Path(src).resolve()), None
    return None, None


def _license(origin: list[dict[str, Any]]) -> str:
    """The license of the nearest upstream card (a hub base's README.md), else 'other'."""
    for step in origin:
        src = str(step["source"])
        try:  # a hub source is in the cache by now: its card came with it
            folder = snapshot(src) if is_hub_id(src) else Path(src)
        except LmforgeError:
            continue
        for card in (folder / CARD, folder / "model" / CARD):
            lic = front_matter(card).get("license")
            if isinstance(lic, str):
                return lic
    return "other"


def _details(mcfg: ModelConfig | None) -> list[str]:
    if mcfg is None:
        return ["A LoRA adapter: apply it to the base model below (`lmforge lora merge` folds it in)."]
    rows = {
        "family": mcfg.arch,
        "parameters": f"{num_params(mcfg):,}",
        "layers": mcfg.n_layers,
        "hidden size": mcfg.dim,
        "attention heads (kv heads)": f"{mcfg.n_heads} ({mcfg.kv_heads})",
        "feed-forward size": mcfg.hidden_dim,
        "vocabulary": mcfg.vocab_size,
        "context length": mcfg.max_seq_len,
        "tied embeddings": mcfg.tie_embeddings,
    }
    return ["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]


def _numbers(title: str, data: Any) -> list[str]:
    """A flat `key | value` table of the numbers (and short strings) in a JSON report."""
    flat: list[tuple[str, Any]] = []

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, bool | int | float) or (isinstance(d, str) and len(d) < 80):
            flat.append((prefix.rstrip("."), d))

    walk(data, "")
    if not flat:
        return []
    rows = [f"| {k} | {f'{v:.6g}' if isinstance(v, float) else v} |" for k, v in flat]
    return [f"### {title}", "", "| metric | value |", "|---|---|", *rows, ""]


def _evaluation(stage: Path) -> list[str]:
    out: list[str] = []
    summary = _json(stage / "summary.json")
    for key in ("val_before", "val_after", "reward_accuracy"):
        if key in summary:
            out += _numbers(key.replace("_", " "), summary[key])
    metrics = stage / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line.strip()]
        evals = [r for r in rows if isinstance(r, dict) and r.get("kind") == "eval"]
        if evals:
            last = {k: v for k, v in evals[-1].items() if k not in ("kind", "time", "step")}
            out += _numbers(f"last evaluation (step {evals[-1].get('step')})", last)
    quant = _json(stage / "quant_report.json")
    if quant:
        out += _numbers("quantization quality", {k: quant[k] for k in ("perplexity", "size") if k in quant})
    return out or ["No evaluation was recorded in this folder; run `lmforge eval model=<this folder>`."]


def _yaml_block(data: dict[str, Any]) -> list[str]:
    return ["```yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]


def render(
    stage: Path, *, kind: str, name: str, mcfg: ModelConfig | None, library: str, tags: list[str]
) -> str:
    config = _yaml(stage / RUN_CONFIG)
    origin = chain(config)
    base, revision = _base_model(origin)
    found = inputs(config)
    upstream = [row for step in origin for row in inputs(step["config"])]  # what the source was trained on
    datasets = sorted(
        {sha for key, _, sha in [*found, *upstream] if sha and key.split(".")[0] in ("data", "text")}
    )
    meta: dict[str, Any] = {"license": _license(origin), "library_name": library}
    if base is not None:
        meta["base_model"] = base
        if revision:
            meta["base_model_revision"] = revision
    if datasets:
        meta["datasets"] = datasets
    method = [config["method"]] if isinstance(config.get("method"), str) else []  # lora, int8, ...
    meta["tags"] = list(dict.fromkeys(["lmforge", kind, *method, *tags]))
    meta["pipeline_tag"] = "text-generation"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    made = f"made by `lmforge {config.get('command', kind)}` (lmforge {__version__})"
    article = "An" if kind[0] in "aeiou" else "A"
    lines += [f"{article} {kind} model {made}" + (f" from `{base}`." if base else "."), ""]
    lines += ["## Model details", "", *_details(mcfg), ""]
    lines += [
        "## How it was made",
        "",
        f"The resolved `{RUN_CONFIG}` of this stage:",
        "",
        *_yaml_block(config),
    ]
    trained = next((s for s in origin if s["command"] in TRAINING), None)
    if trained is not None and config.get("command") not in TRAINING:
        lines += [
            f"The training run it comes from (`{trained['source']}`):",
            "",
            *_yaml_block(trained["config"]),
        ]
    lines += [
        "## Data provenance",
        "",
        "| input | value | sha256 (of its manifest, or the file) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | `{v}` | {sha or ('pinned revision' if is_hub_id(v) else 'no manifest')} |"
        for k, v, sha in found
    ]
    if origin:
        lines += ["", "Chain of stages, newest first:", ""]
        for i, step in enumerate(origin, 1):
            lines.append(
                f"{i}. `{step['source']}` ({step['command'] or 'source model'}, {step['sha256'] or '-'})"
            )
    lines += ["", "## Evaluation results", "", *_evaluation(stage), ""]
    parity = _json(stage / "parity.json")
    lines += ["## Parity", ""]
    lines += (
        _numbers(f"{parity.get('runtime', '')} against lmforge", parity)
        if parity
        else ["No parity report here."]
    )
    lines += ["", "## Intended use and limitations", "", INTENDED_USE, ""]
    return "\n".join(lines)


INTENDED_USE = (
    "Research and experimentation with the data and recipe above. The model was not evaluated for safety, "
    "bias or factual accuracy beyond the numbers in this card; it inherits the limitations and the licence "
    "of its base model and data. Chat models end each turn with the template's end-of-turn token (listed "
    "as `eos_token_id` in generation_config.json); stop generation there."
)


def write_card(
    folder: Path,
    *,
    stage: Path,
    kind: str,
    mcfg: ModelConfig | None,
    name: str | None = None,
    library: str = "lmforge",
    tags: list[str] | None = None,
) -> Path:
    """Write `folder/README.md` from the files of `stage` (the folder holding config.yaml and reports)."""
    config = _yaml(stage / RUN_CONFIG)
    source = next((config[k] for k in SOURCE_KEYS if isinstance(config.get(k), str)), None)
    title = name or (model_name(stage) if kind in TRAINING or source is None else model_name(source))
    text = render(stage, kind=kind, name=title, mcfg=mcfg, library=library, tags=tags or [])
    atomic_write_text(folder / CARD, text + "\n")
    return folder / CARD


__all__ = ["CARD", "chain", "digest", "front_matter", "inputs", "model_name", "render", "write_card"]
