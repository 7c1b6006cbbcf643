"""Hugging Face checkpoints in and out: a local HF folder <-> lmforge `Transformer`, with the key maps as data.

    from lmforge.model.hf import load_hf, save_hf
    model, cfg = load_hf("path/to/Llama-3.2-1B")            # config.json + (sharded) safetensors
    save_hf(model, "out/hf", tokenizer_dir="runs/demo/tokenizer")
    # then: transformers.AutoModelForCausalLM.from_pretrained("out/hf")  (no trust_remote_code)

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel. One table per family
(`KEY_MAPS`) drives both directions; each rule says how the tensors relate: `same`, `transpose` (GPT-2's
Conv1D stores weights as (in, out)) or `fused3`/`fused3_t` (GPT-2's c_attn packs q, k, v in one tensor).
Loading checks the checkpoint against the model before copying anything and lists every missing,
unexpected and mis-shaped tensor by name. Pickle checkpoints (.bin/.pt) run code on load, so they are
refused unless `allow_pickle=True`, and even then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor

from lmforge import crypt
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json, read_json_object, staged_output
from lmforge.model.config import ModelConfig, RopeScaling
from lmforge.model.tensorfile import load_tensors, save_tensors
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import TURN_ENDS

# ---------------------------------------------------------------------------------------------------------
# Key maps: (lmforge names, HF name, relation). "{i}" is the layer index. Rules whose lmforge tensors the
# model does not have (biases off, tied head, no learned positions) are dropped for that config.

Kind = Literal["same", "transpose", "fused3", "fused3_t"]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    hf: str
    kind: Kind = "same"


def _same(ours: str, hf: str) -> Rule:
    return Rule((ours,), hf)


_LLAMA = (
    _same("tok_embeddings.weight", "model.embed_tokens.weight"),
    _same("norm.weight", "model.norm.weight"),
    _same("output.weight", "lm_head.weight"),
    _same("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *(_same(f"layers.{{i}}.attn.{p}.{t}", f"model.layers.{{i}}.self_attn.{p}_proj.{t}") for p in "qkv" for t in ("weight", "bias")),
    _same("layers.{i}.attn.o.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    _same("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *(_same(f"layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")),
)  # fmt: skip

_GPT2 = (
    _same("tok_embeddings.weight", "transformer.wte.weight"),
    _same("pos_embeddings.weight", "transformer.wpe.weight"),
    _same("norm.weight", "transformer.ln_f.weight"),
    _same("norm.bias", "transformer.ln_f.bias"),
    _same("output.weight", "lm_head.weight"),
    *(_same(f"layers.{{i}}.attn_norm.{t}", f"transformer.h.{{i}}.ln_1.{t}") for t in ("weight", "bias")),
    Rule(tuple(f"layers.{{i}}.attn.{p}.weight" for p in "qkv"), "transformer.h.{i}.attn.c_attn.weight", "fused3_t"),
    Rule(tuple(f"layers.{{i}}.attn.{p}.bias" for p in "qkv"), "transformer.h.{i}.attn.c_attn.bias", "fused3"),
    Rule(("layers.{i}.attn.o.weight",), "transformer.h.{i}.attn.c_proj.weight", "transpose"),
    _same("layers.{i}.attn.o.bias", "transformer.h.{i}.attn.c_proj.bias"),
    *(_same(f"layers.{{i}}.mlp_norm.{t}", f"transformer.h.{{i}}.ln_2.{t}") for t in ("weight", "bias")),
    Rule(("layers.{i}.mlp.up.weight",), "transformer.h.{i}.mlp.c_fc.weight", "transpose"),
    _same("layers.{i}.mlp.up.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    Rule(("layers.{i}.mlp.down.weight",), "transformer.h.{i}.mlp.c_proj.weight", "transpose"),
    _same("layers.{i}.mlp.down.bias", "transformer.h.{i}.mlp.c_proj.bias"),
)  # fmt: skip

# HF architecture -> (model_type, lmforge arch, key map)
ARCHITECTURES: dict[str, tuple[str, str, tuple[Rule, ...]]] = {
    "LlamaForCausalLM": ("llama", "llama", _LLAMA),
    "MistralForCausalLM": ("mistral", "llama", _LLAMA),
    "Qwen2ForCausalLM": ("qwen2", "llama", _LLAMA),
    "GPT2LMHeadModel": ("gpt2", "gpt2", _GPT2),
}
KEY_MAPS = {arch: rules for arch, (_, _, rules) in ARCHITECTURES.items()}
# Reward models (model/reward.py): the same decoder under a scalar `score` head instead of `lm_head`.
SEQUENCE_CLASSIFIERS = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
}
SCORE_KEY = "score.weight"

# Checkpoint entries that are buffers, not weights: skipped on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


def rules_for(cfg: ModelConfig, architecture: str) -> list[Rule]:
    """The key map expanded to every layer, keeping the rules this config's model has tensors for."""
    with torch.device("meta"):
        have = set(Transformer(cfg).state_dict())
    out = []
    for rule in KEY_MAPS[architecture]:
        for i in range(cfg.n_layers) if "{i}" in rule.hf else [0]:
            r = Rule(tuple(k.format(i=i) for k in rule.ours), rule.hf.format(i=i), rule.kind)
            if all(k in have for k in r.ours):
                out.append(r)
    return out


def _to_hf(rule: Rule, ours: list[Tensor]) -> Tensor:
    if rule.kind == "same":
        return ours[0]
    if rule.kind == "transpose":
        return ours[0].t()
    if rule.kind == "fused3":
        return torch.cat(ours, dim=0)
    return torch.cat(ours, dim=0).t()  # fused3_t: (3*out, in) -> Conv1D (in, 3*out)


def _from_hf(rule: Rule, t: Tensor) -> list[Tensor]:
    if rule.kind == "same":
        return [t]
    if rule.kind == "transpose":
        return [t.t()]
    if rule.kind == "fused3":
        return list(t.chunk(3, dim=0))
    return list(t.t().chunk(3, dim=0))


def to_hf_state_dict(model: Transformer, architecture: str) -> dict[str, Tensor]:
    sd = model.state_dict()
    return {r.hf: _to_hf(r, [sd[k] for k in r.ours]).contiguous() for r in rules_for(model.cfg, architecture)}


# ---------------------------------------------------------------------------------------------------------
# Configs


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a
        if a in SEQUENCE_CLASSIFIERS:  # its decoder; the score head is read by model/reward.py
            return SEQUENCE_CLASSIFIERS[a]
    by_type = {mt: a for a, (mt, _, _) in ARCHITECTURES.items()}
    if not archs and d.get("model_type") in by_type:
        return by_type[d["model_type"]]
    named = archs or [d.get("model_type")]
    raise ConfigError(f"config.json: unsupported architecture {named}; supported: {_supported()}")


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers 5 keeps RoPE in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported; supported: default, llama3")
    return theta, RopeScaling(
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
    )


def _require(d: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    if key in d and d[key] not in allowed:
        raise ConfigError(f"config.json: {key}={d[key]!r} is not supported; expected one of {list(allowed)}")


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """An HF config.json (as a dict) -> ModelConfig. Features lmforge does not implement are errors."""
    arch = _architecture(d)
    try:
        if arch == "GPT2LMHeadModel":
            _require(d, "activation_function", ("gelu_new", "gelu_pytorch_tanh"))
            _require(d, "scale_attn_by_inverse_layer_idx", (False,))
            _require(d, "scale_attn_weights", (True,))
            return ModelConfig(
                arch="gpt2",
                vocab_size=d["vocab_size"],
                dim=d["n_embd"],
                n_layers=d["n_layer"],
                n_heads=d["n_head"],
                hidden_dim=d.get("n_inner") or 4 * d["n_embd"],
                max_seq_len=d["n_positions"],
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=d.get("tie_word_embeddings", True),
                init_std=d.get("initializer_range", 0.02),
            )
        _require(d, "hidden_act", ("silu",))
        _require(d, "attention_bias", (False,))  # Llama's flag also adds an o_proj bias
        _require(d, "mlp_bias", (False,))
        _require(d, "use_sliding_window", (False,))  # Qwen2's per-layer windows
        theta, scaling = _rope(d)
        return ModelConfig(
            arch="llama",
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or None,
            hidden_dim=d["intermediate_size"],
            max_seq_len=d["max_position_embeddings"],
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=d.get("tie_word_embeddings", False),
            sliding_window=d.get("sliding_window") if arch == "MistralForCausalLM" else None,
            init_std=d.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: missing key {e.args[0]!r} for {arch}") from None
    except ValueError as e:  # pydantic validation of the resulting shape
        raise ConfigError(f"config.json: {arch} shape not usable: {e}") from None


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class that implements exactly this config."""
    if cfg.arch == "gpt2":
        return "GPT2LMHeadModel"
    if cfg.qkv_bias:
        if cfg.sliding_window is not None:
            raise ConfigError("no supported HF architecture has q/k/v bias and a sliding window")
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window is not None else "LlamaForCausalLM"


def config_to_hf(
    cfg: ModelConfig,
    *,
    architecture: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """ModelConfig -> an HF config.json dict that transformers loads without trust_remote_code."""
    arch = architecture or hf_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch!r}; supported: {_supported()}")
    model_type, family, _ = ARCHITECTURES[arch]
    if (
        family != cfg.arch
        or (arch != "Qwen2ForCausalLM" and cfg.qkv_bias)
        or (arch == "Qwen2ForCausalLM" and not cfg.qkv_bias)
    ):
        raise ConfigError(
            f"architecture {arch} cannot represent this model (arch={cfg.arch}, qkv_bias={cfg.qkv_bias})"
        )
    tokens = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    common: dict[str, Any] = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size}
    common |= tokens
    common |= {
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }
    if arch == "GPT2LMHeadModel":
        return common | {
            "n_embd": cfg.dim,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling.model_dump()}
    out = common | {
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "attention_dropout": 0.0,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
    }
    if arch == "LlamaForCausalLM":
        out |= {"attention_bias": False, "mlp_bias": False}
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if arch == "Qwen2ForCausalLM":
        out |= {"use_sliding_window": False, "sliding_window": None}
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "an HF model folder needs config.json", ConfigError)


def read_hf_config(folder: Path) -> dict[str, Any]:
    """An HF folder's config.json as a dict (a ConfigError naming the file when it is missing or not JSON)."""
    return _read_json(folder / "config.json")


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(files, is_pickle): an index's shards if there is one, else the safetensors files, else pickles."""
    files: list[Path] = []
    pickle = False
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            files = [path / s for s in sorted(set(_read_json(index).get("weight_map", {}).values()))]
            pickle = index_name.startswith("pytorch")
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise DataError(f"{index}: shards listed but not found: {', '.join(missing)}")
            break
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            files = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
            pickle = True
    if not files:
        raise DataError(f"{path}: no weights found (expected model.safetensors or an index with shards)")
    if pickle and not allow_pickle:
        raise DataError(
            f"{path}: weights are pickle files ({', '.join(f.name for f in files)}), which can run code when "
            "loaded; convert them to safetensors or pass allow_pickle=True (read with weights_only=True)"
        )
    return files, pickle


def _read_tensors(files: list[Path], pickle: bool) -> Iterator[tuple[str, Tensor]]:
    for f in files:
        if pickle:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()
            continue
        if crypt.is_encrypted(f):
            yield from load_tensors(f).items()
            continue
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, st.get_tensor(key)


def _normalise_key(key: str, family: str) -> str:
    # Original GPT-2 checkpoints store GPT2Model keys ("h.0.attn...") without the "transformer." prefix.
    if family == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def load_hf(
    path: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> tuple[Transformer, ModelConfig]:
    """Load a local HF folder (config.json + safetensors, single or sharded) as an lmforge model."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (expected a Hugging Face model folder)")
    hf_cfg = read_hf_config(path)
    arch = _architecture(hf_cfg)
    cfg = config_from_hf(hf_cfg)
    files, pickle = _weight_files(path, allow_pickle)
    rules = rules_for(cfg, arch)
    with torch.device("meta"):
        meta = Transformer(cfg)
    expected = to_hf_state_dict(meta, arch)  # meta tensors: shapes only
    found: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, t in _read_tensors(files, pickle):
        key = _normalise_key(key, cfg.arch)
        if key in expected:
            found[key] = t
        elif key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the shared weight twice
        elif key == SCORE_KEY and set(hf_cfg.get("architectures") or []) & set(SEQUENCE_CLASSIFIERS):
            continue  # a reward model's head: not part of the decoder
        elif not key.endswith(_IGNORED_SUFFIXES):
            unexpected.append(key)
    missing = [k for k in expected if k not in found]
    bad = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(e.shape)})"
        for k, e in expected.items()
        if k in found and found[k].shape != e.shape
    ]
    problems = [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad))
        if items
    ]
    if problems:
        raise DataError(f"{path}: checkpoint does not match {arch} config: " + "; ".join(problems))
    sd: dict[str, Tensor] = {}
    for r in rules:
        for k, t in zip(r.ours, _from_hf(r, found[r.hf]), strict=True):
            sd[k] = t.to(dtype)
    model = build_model(cfg, device=device, dtype=dtype, seed=None)
    model.load_state_dict(sd, strict=True)
    return model, cfg


# ---------------------------------------------------------------------------------------------------------
# Saving

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _special_token_ids(tokenizer_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids named in tokenizer_config.json, looked up in tokenizer.json; eos is a list (eos first)
    when the tokenizer has other special end-of-turn tokens (TURN_ENDS, e.g. <|im_end|>): runtimes stop at any."""
    tc = tokenizer_dir / "tokenizer_config.json"
    tj = tokenizer_dir / "tokenizer.json"
    if not tc.exists() or not tj.exists():
        return {}
    conf, tok = _read_json(tc), _read_json(tj)
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    out: dict[str, Any] = {}
    for name in ("bos", "eos", "pad"):
        text = conf.get(f"{name}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if isinstance(text, str):
            out[f"{name}_token_id"] = ids.get(text, vocab.get(text) if isinstance(vocab, dict) else None)
    eos = out.get("eos_token_id")
    special = {a["content"]: a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    ends = sorted({i for t, i in special.items() if t in TURN_ENDS} - {eos})
    if eos is not None and ends:
        out["eos_token_id"] = [eos, *ends]
    return out


def _shards(sd: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_hf(
    model: Transformer,
    path: Path | str,
    *,
    tokenizer_dir: Path | str | None = None,
    architecture: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write an HF folder: config.json, model.safetensors (sharded with an index above `max_shard_bytes`),
    generation_config.json, and the tokenizer files from `tokenizer_dir`. Special-token ids come from the
    tokenizer when given (explicit arguments win); the folder appears atomically at `path`."""
    path = Path(path)
    cfg = model.cfg
    arch = architecture or hf_architecture(cfg)
    tokens: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer_dir is not None:
        tokens |= _special_token_ids(Path(tokenizer_dir))
    if bos_token_id is not None:
        tokens["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        tokens["eos_token_id"] = eos_token_id
    if arch == "GPT2LMHeadModel" and tokens["eos_token_id"] is None and cfg.vocab_size > 50256:
        tokens["bos_token_id"] = tokens["eos_token_id"] = 50256  # the GPT-2 tokenizer's <|endoftext|>
    hf_cfg = config_to_hf(cfg, architecture=arch, **tokens)
    sd = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(model, arch).items()}
    dtype = next(iter(sd.values())).dtype
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    with staged_output(path, overwrite=overwrite, resume=False) as out:
        atomic_write_json(out / "config.json", hf_cfg)
        gen = {k: v for k, v in tokens.items() if v is not None}
        atomic_write_json(out / "generation_config.json", {"_from_model_config": True, **gen})
        shards = _shards(sd, max_shard_bytes)
        if len(shards) == 1:
            save_tensors(sd, out / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_tensors(shard, out / name, metadata={"format": "pt"})
                weight_map |= dict.fromkeys(shard, name)
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_json(out / "model.safetensors.index.json", index)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                # Sealed like the weights when encrypting (export turns that off); metadata stays readable.
                if src.exists():
                    seal = None if name == "tokenizer.json" else False
                    crypt.write_bytes(out / name, crypt.read_bytes(src), encrypt=seal)
    return path
