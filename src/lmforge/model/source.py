"""The one model resolver: what a user's model= / base= names -> weights + config + tokenizer, never unpickling.

    model, tok = load_model("runs/demo/pretrain")                 # a pretraining run (uses <run>/model/)
    model, tok = load_model("runs/demo/pretrain/checkpoints/step-000200")   # one checkpoint
    model, tok = load_model("runs/demo/sft")                      # a LoRA/QLoRA run: its base + the adapter
    model, tok = load_model("hf/SmolLM2-135M")                    # a Hugging Face folder (config.json)
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M@main")    # a hub id: its cached snapshot (model/hub.py)
    cfg = model_config("llama-3.2-1b")                            # the shape only (model info, plan)
    model = pretrain_model("tiny", vocab_size=512, seq_len=256, overrides={}, device=dev, seed=0)
    model, tok = load_base("runs/demo/pretrain", seq_len=256)     # a fine-tuning base (train mode)

Folders `load_model` accepts, tried in this order:
- HF folder: config.json + *.safetensors (via `model.hf.load_hf`), tokenizer files in the same folder.
- LoRA/QLoRA adapter: adapter_config.json here, or in adapter/ of a fine-tuning run without model/; the base
  is the one lmforge_base.json (else adapter_config.json) names, loaded as below; a QLoRA adapter's base is
  rounded to NF4 as in training. The adapter is applied, not merged.
- quantized model folder (`lmforge quantize`): quant_config.json + model_config.json + model.safetensors.
- lmforge model folder: model_config.json + model.safetensors.
- run directory: <run>/model/ (above), else its newest checkpoint.
- checkpoint: model.safetensors + state.json in <run>/checkpoints/step-N/; the shape comes from the
  checkpoint's model_config.json, else (older checkpoints) <run>/model/model_config.json, else
  <run>/config.yaml (model + overrides, as pretraining built it).
The tokenizer is the first folder among (the model folder, the run dir) holding tokenizer.json +
tokenizer_config.json, else `<data>/tokenizer` of the run's config.yaml (what `lmforge tokenize` copies).

Every file a load reads (weights, configs, adapter; the tokenizer loader checks its own) is verified
against the manifest its writer recorded before it is parsed (model/integrity.py): a changed byte is an
IntegrityError (exit 3) naming the file; a folder with no manifest (an HF download) loads with one notice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.config import load_config
from lmforge.errors import ConfigError, DataError
from lmforge.io import read_json_object
from lmforge.model.config import MODEL_CONFIG, PRESETS, ModelConfig, get_preset, read_model_config
from lmforge.model.hf import config_from_hf, load_hf, read_hf_config
from lmforge.model.hub import local_path
from lmforge.model.integrity import CHECKPOINT_STATE, latest_checkpoint, load_scope, verify_files
from lmforge.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_lora, read_adapter_config
from lmforge.model.quant import QUANT_CONFIG, load_quantized
from lmforge.model.tensorfile import load_tensors
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
RUN_CONFIG = "config.yaml"
BASE_INFO = "lmforge_base.json"  # written next to the adapter by `lmforge finetune`: {"base", "method"}
# The checkpoint layout train/checkpoint.py writes (model/ cannot import train/): step-N/ with state.json.
# What each kind of folder's loader reads, verified before it is parsed.
HF_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_EXPECTED = (
    "an HF model folder (config.json + safetensors), an lmforge model folder (model_config.json + "
    "model.safetensors), a pretraining run directory, or a checkpoint directory (model.safetensors + state.json)"
)


# -- tokenizer ---------------------------------------------------------------------------------------
def tokenizer_dir(folders: list[Path]) -> Path | None:
    """The first folder holding tokenizer.json + tokenizer_config.json."""
    for d in folders:
        if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
            return d
    return None


def run_config(run: Path) -> dict[str, Any]:
    """A run's config.yaml as a dict ({} when there is none or it is not a mapping)."""
    path = run / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def find_tokenizer(folders: list[Path], run: Path | None) -> Tokenizer:
    found = tokenizer_dir(folders)
    if found is not None:
        return load_tokenizer(found)
    tried = [str(d) for d in folders]
    if run is not None:
        data = run_config(run).get("data")
        if isinstance(data, str):
            cand = Path(data) / "tokenizer"
            if tokenizer_dir([cand]) is not None:
                return load_tokenizer(cand)
            tried.append(str(cand))
    raise DataError(f"no tokenizer (tokenizer.json + tokenizer_config.json) found in: {', '.join(tried)}")


# -- shapes ------------------------------------------------------------------------------------------
def sized_config(spec: str, vocab_size: int, seq_len: int, overrides: dict[str, Any]) -> ModelConfig:
    """A preset or model YAML sized for the data as pretraining does: the data's vocab, a context of at
    least `seq_len` (unless overridden), then `overrides` (`model_overrides`) on top."""
    if Path(spec).suffix in (".yaml", ".yml"):
        base = load_config(ModelConfig, Path(spec)).model_dump()
    else:
        base = get_preset(spec).model_dump()
    fields = {**base, "vocab_size": vocab_size, **overrides}
    if "max_seq_len" in fields and "max_seq_len" not in overrides:
        fields["max_seq_len"] = max(int(fields["max_seq_len"]), seq_len)
    try:
        mcfg = ModelConfig.model_validate(fields)
    except ValueError as e:
        raise ConfigError(f"model_overrides: {e}") from None
    if mcfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model_overrides.vocab_size: {mcfg.vocab_size} < the data's vocab_size {vocab_size}"
        )
    if mcfg.max_seq_len < seq_len:
        raise ConfigError(
            f"seq_len: {seq_len} exceeds model_overrides.max_seq_len {mcfg.max_seq_len}; raise it or lower seq_len"
        )
    return mcfg


def _rebuilt_config(run: Path, cfg: dict[str, Any]) -> ModelConfig:
    """The shape a pretraining run built, from its config.yaml (for checkpoints without model_config.json)."""
    command = cfg.get("command", "pretrain")
    if command != "pretrain":
        raise ConfigError(
            f"{run / RUN_CONFIG}: a {command} run; only pretraining rebuilds a model from its config"
        )
    spec = str(cfg.get("model", "tiny"))  # PretrainConfig's defaults
    if Path(spec).is_dir():
        return config_from_hf(read_hf_config(Path(spec)))
    data = cfg.get("data")
    if not isinstance(data, str):
        raise ConfigError(f"{run / RUN_CONFIG}: no `data:` tokens directory to size the model {spec!r} by")
    index = Path(data) / "index.json"
    vocab = read_json_object(index, "written by `lmforge tokenize`").get("vocab_size")
    if not isinstance(vocab, int):
        raise DataError(f"{index}: vocab_size missing or not an integer")
    overrides = cfg.get("model_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{run / RUN_CONFIG}: model_overrides is not a mapping")
    return sized_config(spec, vocab, int(cfg.get("seq_len", 256)), overrides)


def checkpoint_config(ckpt: Path, run: Path) -> ModelConfig:
    """The shape of a checkpoint's model: its own model_config.json, else (checkpoints written before they
    carried one) the run's model/model_config.json, else rebuilt from the run's config.yaml."""
    for saved in (ckpt / MODEL_CONFIG, run / "model" / MODEL_CONFIG):
        if saved.is_file():
            return read_model_config(saved)
    cfg = run_config(run)
    if not cfg:
        raise DataError(
            f"{ckpt}: a checkpoint needs {run / 'model' / MODEL_CONFIG} or {run / RUN_CONFIG} to know the "
            "model's shape"
        )
    return _rebuilt_config(run, cfg)


def _model_section(data: Any, source: Path) -> ModelConfig:
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected ModelConfig keys or a `model:` section")
    try:
        return ModelConfig.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"{source}: not a model config: {str(e).splitlines()[0]} ...") from None


def _read_data(path: Path) -> Any:
    try:
        text = path.read_text("utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({e})") from None


def _folder_config(path: Path) -> ModelConfig:
    if (path / "config.json").exists():
        return config_from_hf(read_hf_config(path))
    for saved in (path / MODEL_CONFIG, path / "model" / MODEL_CONFIG):  # a model folder, a finished run
        if saved.is_file():
            return read_model_config(saved)
    run_yaml = path / RUN_CONFIG
    if not run_yaml.is_file():
        raise ConfigError(
            f"{path}: no config.json (HF folder), {MODEL_CONFIG} (lmforge model) or config.yaml (run) found"
        )
    data = _read_data(run_yaml)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return _model_section(data, run_yaml)
    try:  # `model:` names a preset or a file: rebuild the shape as the run did
        return checkpoint_config(path, path)
    except (ValueError, DataError) as e:  # not a pretraining run's config
        raise ConfigError(f"{run_yaml}: cannot tell the model's shape ({e})") from None


def model_config(spec: str) -> ModelConfig:
    """A preset name, HF folder, lmforge model folder, run folder or YAML/JSON file -> ModelConfig."""
    if spec in PRESETS:
        return get_preset(spec)
    path = local_path(spec)
    if path.is_dir():
        return _folder_config(path)
    if path.is_file():
        data = _read_data(path)
        if isinstance(data, dict) and "architectures" in data:
            return config_from_hf(data)
        return _model_section(data, path)
    raise ConfigError(f"model {spec!r}: not a preset ({', '.join(PRESETS)}) nor an existing file or folder")


# -- adapters ----------------------------------------------------------------------------------------
def adapter_dir(path: Path) -> Path | None:
    """A LoRA adapter folder (or a fine-tuning run whose result is one), else None."""
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file() and not (path / "model").is_dir():
        return path / "adapter"
    return None


def verify_adapter(adapter: Path) -> None:
    """Check an adapter folder's files (config, weights, base record, the tokenizer that `lora merge` copies)
    against its manifest."""
    verify_files(
        adapter, [ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_INFO, "tokenizer.json", "tokenizer_config.json"]
    )


def find_adapter(path: Path) -> Path:
    """The adapter folder of `path` (itself or its adapter/), verified; else a DataError saying what is there."""
    for cand in (path, path / "adapter"):
        if (cand / ADAPTER_CONFIG).is_file():
            verify_adapter(cand)
            return cand
    if (path / "model").is_dir():
        raise DataError(f"{path}: a full fine-tune (model/), not an adapter: there is nothing to merge")
    raise DataError(f"{path}: no adapter_config.json here or in {path / 'adapter'} (expected a PEFT adapter)")


def base_info(adapter: Path) -> dict[str, Any]:
    """lmforge_base.json next to the adapter ({} for adapters from elsewhere, e.g. PEFT itself)."""
    path = adapter / BASE_INFO
    return read_json_object(path, "written by lmforge finetune") if path.is_file() else {}


def adapter_base(adapter: Path, named: str | None = None) -> Path:
    """The base folder of `adapter`: `named` (a user's base=), else the one the adapter records."""
    peft_cfg = read_adapter_config(adapter)
    found = named or base_info(adapter).get("base") or peft_cfg.get("base_model_name_or_path")
    if not found:
        raise ConfigError(f"base: {adapter} does not name its base model; set base=<model folder>")
    base = local_path(str(found))
    if not base.is_dir():
        where = "base" if named else f"base (from {adapter})"
        raise ConfigError(
            f"{where}: {found} is not a folder; expected an HF model folder or an lmforge model folder / run "
            "dir (an adapter trained on a preset's random weights cannot be merged)"
        )
    return base


def is_qlora(adapter: Path) -> bool:
    """Whether `lmforge finetune` trained the adapter on an NF4 base (method=qlora)."""
    return base_info(adapter).get("method") == "qlora"


def _load_adapted(
    adapter: Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[Transformer, Tokenizer]:
    """Base + adapter applied (not merged), in eval mode; a QLoRA base is rounded to NF4 as in training."""
    verify_adapter(adapter)
    base = adapter_base(adapter)
    model, base_tok = load_model(base, device=device, dtype=dtype)
    load_adapter(model, adapter, quantize_base=is_qlora(adapter))
    tok_dir = tokenizer_dir([adapter])  # `lmforge finetune` saves the tokenizer it trained with here
    # apply_lora builds the adapter on the base's device; eval() turns its dropout off.
    return model.eval(), load_tokenizer(tok_dir) if tok_dir is not None else base_tok


# -- loading -----------------------------------------------------------------------------------------
def _load_weights(model: Transformer, file: Path) -> None:
    if not file.is_file():
        raise DataError(f"{file}: not found")
    sd = load_tensors(file)
    # DDP / torch.compile wrappers prefix parameter names; the weights are the same.
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DataError(
            f"{file}: weights do not match the model config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )


def _build(mcfg: ModelConfig, weights: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    model = build_model(mcfg, device=device, dtype=dtype, seed=None)
    _load_weights(model, weights)
    return model.eval()


def _load_folder(folder: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """An lmforge model folder (model_config.json + model.safetensors), verified first."""
    verify_files(folder, [MODEL_CONFIG, WEIGHTS])
    return _build(read_model_config(folder / MODEL_CONFIG), folder / WEIGHTS, device, dtype)


def hf_files(folder: Path) -> list[str]:
    """The files `load_hf` may read in an HF folder: config.json, weight indexes and weight files."""
    return [*HF_FILES, *sorted({f.name for pattern in HF_WEIGHTS for f in folder.glob(pattern)})]


def _load_checkpoint(
    p: Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[Transformer, Tokenizer]:
    """A checkpoint directory, or the newest checkpoint of a run without model/."""
    ckpt: Path | None = None
    if (p / WEIGHTS).is_file() and (p / CHECKPOINT_STATE).is_file():
        ckpt = p
    elif (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p / "checkpoints")
    if ckpt is None:
        raise DataError(f"{p}: not a model folder; expected {_EXPECTED}")
    run = ckpt.parent.parent
    verify_files(ckpt, [WEIGHTS, MODEL_CONFIG])  # not the optimizer state: only a resume reads that
    model = _build(checkpoint_config(ckpt, run), ckpt / WEIGHTS, device, dtype)
    return model, find_tokenizer([ckpt, run / "model", run], run)


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer]:
    """(model in eval mode, tokenizer) from any folder listed in the module docstring, each file verified."""
    p = local_path(path)
    if not p.is_dir():
        raise DataError(f"{p}: not a directory; expected {_EXPECTED} or a hub id ORG/NAME[@REVISION]")
    with load_scope():
        return _resolve(p, device, dtype)


def _resolve(p: Path, device: str | torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer]:
    if (p / "config.json").is_file():
        verify_files(p, hf_files(p))
        model, _ = load_hf(p, dtype=dtype, device=device)
        return model.eval(), find_tokenizer([p], None)
    adapter = adapter_dir(p)
    if adapter is not None:
        return _load_adapted(adapter, device, dtype)
    if (p / QUANT_CONFIG).is_file():  # an `lmforge quantize` output folder
        verify_files(p, [QUANT_CONFIG, MODEL_CONFIG, WEIGHTS])
        return load_quantized(p, device=device, dtype=dtype), find_tokenizer([p], None)
    if (p / MODEL_CONFIG).is_file() and not (p / CHECKPOINT_STATE).is_file():
        run = p.parent if (p.parent / RUN_CONFIG).is_file() else None
        return _load_folder(p, device, dtype), find_tokenizer([p, p.parent], run)
    if (p / "model" / MODEL_CONFIG).is_file():
        return _load_folder(p / "model", device, dtype), find_tokenizer([p / "model", p], p)
    return _load_checkpoint(p, device, dtype)


# -- training starts ---------------------------------------------------------------------------------
def pretrain_model(
    spec: str,
    *,
    vocab_size: int,
    seq_len: int,
    overrides: dict[str, Any],
    device: torch.device | str,
    seed: int,
) -> Transformer:
    """Pretraining's model: a preset name or model YAML (sized by `sized_config`, fresh weights from `seed`),
    or an HF folder / hub id (continued pretraining, its own shape and weights)."""
    path = local_path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model: {path} is a directory without config.json; expected an HF model folder"
            )
        if overrides:
            raise ConfigError("model_overrides: cannot change the shape of a pretrained HF model")
        with load_scope():
            verify_files(path, hf_files(path))
            model, mcfg = load_hf(path, device=device)
        if mcfg.vocab_size < vocab_size:
            raise ConfigError(
                f"model: {path} has vocab_size {mcfg.vocab_size} but the data uses ids up to {vocab_size - 1}"
            )
        if mcfg.max_seq_len < seq_len:
            raise ConfigError(f"seq_len: {seq_len} exceeds the context of {path} ({mcfg.max_seq_len})")
        return model
    mcfg = sized_config(spec, vocab_size, seq_len, overrides)
    return build_model(mcfg, device=device, dtype=torch.float32, seed=seed)


def load_base(
    base: str,
    *,
    tokenizer: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    seq_len: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Transformer, Tokenizer]:
    """(model in train mode, tokenizer) from a model folder / run / checkpoint / HF folder, or a preset."""
    with load_scope():
        return _load_base(base, tokenizer, model_overrides, seq_len, device, seed)


def _load_base(
    base: str,
    tokenizer: str | None,
    model_overrides: dict[str, Any] | None,
    seq_len: int,
    device: torch.device | str,
    seed: int,
) -> tuple[Transformer, Tokenizer]:
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    path = local_path(base)
    if path.is_dir():
        if adapter_dir(path) is not None:
            raise ConfigError(
                f"base: {path} is a LoRA adapter, not a model; fold it into its base with "
                "`lmforge lora merge` and fine-tune the merged folder"
            )
        if model_overrides:
            raise ConfigError("model_overrides: only a preset base can be reshaped")
        model, found = load_model(path, device=device)
        tok = tok or found
    elif path.suffix or "/" in base:
        raise ConfigError(
            f"base: {base} is not a directory; expected a model folder, run dir, hub id ORG/NAME[@REVISION] "
            "or a preset name"
        )
    else:
        if tok is None:
            raise ConfigError(f"tokenizer: a preset base ({base!r}) needs a tokenizer folder")
        fields = {**get_preset(base).model_dump(), "vocab_size": tok.vocab_size, **(model_overrides or {})}
        fields["max_seq_len"] = max(int(fields["max_seq_len"]), seq_len)
        try:
            mcfg = ModelConfig.model_validate(fields)
        except ValueError as e:
            raise ConfigError(f"model_overrides: {e}") from None
        model = build_model(mcfg, device=device, dtype=torch.float32, seed=seed)
    vocab = int(model.cfg.vocab_size)
    if tok.vocab_size > vocab:
        raise ConfigError(f"tokenizer: {tok.vocab_size} tokens but the model has only {vocab} embeddings")
    if seq_len > int(model.cfg.max_seq_len):
        raise ConfigError(f"seq_len: {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    return model.train(), tok


def load_merged_base(
    spec: str, *, tokenizer: str | None, device: torch.device | str, seed: int
) -> tuple[Transformer, Tokenizer, Path | None]:
    """`load_base`, except that a LoRA fine-tuning result is merged into its base first (align dpo's policy).
    Returns (model in train mode, tokenizer, the merged adapter folder or None)."""
    adapter = adapter_dir(local_path(spec))
    if adapter is None:
        return (*load_base(spec, tokenizer=tokenizer, device=device, seed=seed), None)
    verify_adapter(adapter)
    base = str(read_adapter_config(adapter).get("base_model_name_or_path") or "")
    if not local_path(base).is_dir():
        raise ConfigError(
            f"model: {adapter} adapts {base!r}, which is not a model folder here; merge it with "
            "`lmforge lora merge` and point model= at the result"
        )
    tokenizer = tokenizer or (str(adapter) if (adapter / "tokenizer.json").is_file() else None)
    model, tok = load_base(base, tokenizer=tokenizer, device=device, seed=seed)
    load_adapter(model, adapter)
    merge_lora(model)
    return model, tok, adapter


__all__ = [
    "BASE_INFO",
    "MODEL_CONFIG",
    "WEIGHTS",
    "adapter_base",
    "adapter_dir",
    "base_info",
    "checkpoint_config",
    "find_adapter",
    "find_tokenizer",
    "hf_files",
    "is_qlora",
    "load_base",
    "load_merged_base",
    "load_model",
    "model_config",
    "pretrain_model",
    "read_model_config",
    "run_config",
    "sized_config",
    "tokenizer_dir",
    "verify_adapter",
]
