"""GGUF export for llama.cpp: metadata, BPE tokenizer, chat template and tensors as llama.cpp names them.

    from lmforge.export.gguf import write_gguf, read_gguf
    write_gguf(model, tok, "out/model.gguf", "q8_0")      # f32 | f16 | q8_0
    model2, meta = read_gguf("out/model.gguf")             # dequantized back into an lmforge Transformer
    # then: llama-cli -m out/model.gguf

Follows llama.cpp's convert_hf_to_gguf.py:
- Llama family (Llama, Mistral without a window) -> arch `llama`. llama.cpp's `llama` graph applies RoPE
  to interleaved pairs (x0, x1), (x2, x3)...; our weights (like HF's) use the rotate-half layout, so the
  rows of q and k are permuted per head (`_permute`, exactly convert_hf_to_gguf's `LlamaModel.permute`).
  Llama-3 RoPE scaling travels as the `rope_freqs.weight` tensor of per-frequency divisors.
- q/k/v bias (Qwen2) -> arch `qwen2` (NEOX RoPE = rotate-half, so no permutation; biases required).
- GPT-2 -> arch `gpt2`: fused `attn_qkv`, learned `position_embd` (kept f32), `output` written as a copy of
  the tied embedding as convert_hf_to_gguf does.
- 1-D tensors (norms, biases) stay f32 in every file type; 2-D weights are f32, f16 or Q8_0 (blocks of 32
  with one fp16 scale; a tensor whose rows are not a multiple of 32 falls back to f16, as in llama.cpp).
Tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE), pre-tokenizer `gpt-2` (our regex is GPT-2's),
tokens, token types (special tokens CONTROL), merges, bos/eos/pad ids, the end-of-turn id (`eot`, the chat
template's <|im_end|>) and `tokenizer.chat_template`. `general.name` is the model's name (`card.model_name`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, build_model, rope_inv_freq
from lmforge.tokenizer import Tokenizer

GgufType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 split regex, which our byte-level BPE uses


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp architecture for this config; ConfigError for what llama.cpp would run differently."""
    if cfg.arch == "gpt2":
        return "gpt2"
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        raise ConfigError(
            f"gguf: sliding_window={cfg.sliding_window} is not represented by llama.cpp's llama architecture "
            "(it would attend to the full context); export to hf or onnx instead"
        )
    if cfg.qkv_bias:
        if cfg.rope_scaling is not None:
            raise ConfigError("gguf: q/k/v bias (qwen2) together with Llama-3 RoPE scaling is not supported")
        return "qwen2"
    return "llama"


def check_supported(cfg: ModelConfig, qtype: str) -> str:
    """Fail before writing anything: the arch and type must both be supported."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"gguf: type {qtype!r} is not supported; supported: {', '.join(GGUF_TYPES)}")
    return gguf_arch(cfg)


# ---------------------------------------------------------------------------------------------------------
# Tensors


def _permute(w: Tensor, n_head: int) -> Tensor:
    """Rotate-half rows -> llama.cpp's interleaved-pair rows, per head: (n_head, 2, hd/2, ...) -> (n_head, hd/2, 2, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: Tensor, n_head: int) -> Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freq_factors(cfg: ModelConfig) -> Tensor:
    """llama.cpp divides each RoPE frequency by its factor: factor = unscaled / scaled inverse frequency."""
    plain = rope_inv_freq(cfg.model_copy(update={"rope_scaling": None}))
    return (plain / rope_inv_freq(cfg)).float()


def gguf_tensors(model: Transformer) -> dict[str, Tensor]:
    """lmforge state dict -> {llama.cpp tensor name: tensor in PyTorch (out, in) layout}."""
    cfg = model.cfg
    arch = gguf_arch(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {"token_embd.weight": sd["tok_embeddings.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_embeddings.weight"]
        out["output_norm.weight"], out["output_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["output_norm.weight"] = sd["norm.weight"]
    if "output.weight" in sd:
        out["output.weight"] = sd["output.weight"]
    elif arch == "gpt2":
        out["output.weight"] = sd["tok_embeddings.weight"]  # llama.cpp's gpt2 reads `output`
    if arch == "llama" and cfg.rope_scaling is not None:
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for ours, theirs in block_names(cfg, arch):
            out[b + theirs] = sd[p + ours]
        if arch == "gpt2":  # one fused qkv matrix (and bias)
            for t in ("weight", "bias"):
                out[b + f"attn_qkv.{t}"] = torch.cat([sd[p + f"attn.{x}.{t}"] for x in "qkv"], dim=0)
        elif arch == "llama":  # llama.cpp's RoPE pairs adjacent dims: permute q/k rows as its converter does
            out[b + "attn_q.weight"] = _permute(sd[p + "attn.q.weight"], cfg.n_heads)
            out[b + "attn_k.weight"] = _permute(sd[p + "attn.k.weight"], cfg.kv_heads)
    return out


def block_names(cfg: ModelConfig, arch: str) -> list[tuple[str, str]]:
    """(lmforge name, llama.cpp name) of the tensors of one block that map one to one, both directions;
    gpt2's fused qkv and llama's permuted q/k are handled beside it."""
    if arch == "gpt2":
        pairs = [("attn_norm", "attn_norm"), ("attn.o", "attn_output"), ("mlp_norm", "ffn_norm")]
        pairs += [("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")]
        return [(f"{o}.{t}", f"{g}.{t}") for o, g in pairs for t in ("weight", "bias")]
    names = [("attn_norm.weight", "attn_norm.weight"), ("attn.v.weight", "attn_v.weight")]
    if arch != "llama":  # qwen2: q and k as they are
        names += [("attn.q.weight", "attn_q.weight"), ("attn.k.weight", "attn_k.weight")]
    if cfg.qkv_bias:
        names += [(f"attn.{x}.bias", f"attn_{x}.bias") for x in "qkv"]
    names += [("attn.o.weight", "attn_output.weight"), ("mlp_norm.weight", "ffn_norm.weight")]
    return names + [(f"mlp.{x}.weight", f"ffn_{x}.weight") for x in ("gate", "up", "down")]


def _stays_f32(name: str, t: Tensor) -> bool:
    return t.dim() <= 1 or name.startswith(("position_embd", "rope_freqs"))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _vocab(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's BPE vocab wants them, padded to the model's rows."""
    import gguf

    backend = tok.backend
    data = json.loads(backend.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise ConfigError(
            "gguf: only byte-level BPE tokenizers are supported (tokenizer.json model.type=BPE)"
        )
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab:
        raise DataError(
            f"gguf: tokenizer has {len(by_id)} tokens but the model only {n_vocab} embedding rows"
        )
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    user = {a["id"] for a in data.get("added_tokens", []) if not a.get("special")}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in user else None
        types.append(int(kind or gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_gguf(
    model: Transformer, tok: Tokenizer, path: Path | str, qtype: str, *, name: str = "lmforge"
) -> dict[str, Any]:
    """Write one GGUF file; returns {tensor name: ggml type name} for the report."""
    import gguf

    cfg = model.cfg
    arch = check_supported(cfg, qtype)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(int(file_type))
    if qtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_size)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.head_size != cfg.dim // cfg.n_heads:
            w.add_key_length(cfg.head_size)
            w.add_value_length(cfg.head_size)
    tokens, types, merges = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    turn_ends = tok.end_of_turn_ids()[1:]
    if (
        turn_ends
    ):  # <|im_end|>: llama.cpp ends a generation at eos or eot, so a chat reply stops at its turn end
        w.add_eot_token_id(turn_ends[0])
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)  # our tokenizer never prepends BOS on its own
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)
    types_written: dict[str, Any] = {}
    for tname, t in gguf_tensors(model).items():
        arr = t.contiguous().numpy().astype(np.float32)
        if _stays_f32(tname, t) or qtype == "f32":
            w.add_tensor(tname, arr)
            types_written[tname] = "F32"
        elif qtype == "f16" or arr.shape[-1] % 32:
            w.add_tensor(tname, arr.astype(np.float16))
            types_written[tname] = "F16"
        else:
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(tname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
            types_written[tname] = "Q8_0"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types_written


# ---------------------------------------------------------------------------------------------------------
# Reading back (the verification runtime when llama.cpp is not installed)


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of a GGUF file as Python values (arrays as lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        val = field.contents()
        out[key] = val
    return out


def read_tensors(reader: Any) -> dict[str, np.ndarray]:
    """{name: float32 array in PyTorch (out, in) layout}, dequantized where needed."""
    import gguf

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.asarray(t.data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = arr.reshape(shape)
    return out


def read_gguf(path: Path | str) -> tuple[Transformer, dict[str, Any]]:
    """Rebuild an lmforge Transformer from the GGUF's own metadata and (dequantized) tensors."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: GGUF file not found")
    reader = gguf.GGUFReader(str(path))
    meta = read_metadata(reader)
    arch = meta["general.architecture"]
    tensors = {k: torch.from_numpy(v.copy()) for k, v in read_tensors(reader).items()}

    def m(key: str) -> Any:
        return meta[f"{arch}.{key}"]

    n_vocab = len(meta["tokenizer.ggml.tokens"])
    common = {
        "vocab_size": n_vocab,
        "dim": int(m("embedding_length")),
        "n_layers": int(m("block_count")),
        "n_heads": int(m("attention.head_count")),
        "hidden_dim": int(m("feed_forward_length")),
        "max_seq_len": int(m("context_length")),
    }
    if arch == "gpt2":
        cfg = ModelConfig(
            arch="gpt2", norm_eps=float(m("attention.layer_norm_epsilon")), tie_embeddings=False, **common
        )
    elif arch in ("llama", "qwen2"):
        hd = meta.get(f"{arch}.attention.key_length")
        cfg = ModelConfig(
            arch="llama",
            n_kv_heads=int(m("attention.head_count_kv")),
            head_dim=int(hd) if hd is not None else None,
            norm_eps=float(m("attention.layer_norm_rms_epsilon")),
            rope_theta=float(m("rope.freq_base")),
            qkv_bias=arch == "qwen2",
            tie_embeddings="output.weight" not in tensors,
            **common,
        )
    else:
        raise DataError(f"{path}: architecture {arch!r} is not one lmforge reads (llama, qwen2, gpt2)")
    sd: dict[str, Tensor] = {"tok_embeddings.weight": tensors["token_embd.weight"]}
    sd["norm.weight"] = tensors["output_norm.weight"]
    if "output.weight" in tensors and not cfg.tie_embeddings:
        sd["output.weight"] = tensors["output.weight"]
    if arch == "gpt2":
        sd["pos_embeddings.weight"] = tensors["position_embd.weight"]
        sd["norm.bias"] = tensors["output_norm.bias"]
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for ours, theirs in block_names(cfg, arch):
            sd[p + ours] = tensors[b + theirs]
        if arch == "gpt2":
            for t in ("weight", "bias"):
                for x, part in zip("qkv", tensors[b + f"attn_qkv.{t}"].chunk(3, dim=0), strict=True):
                    sd[p + f"attn.{x}.{t}"] = part
        elif arch == "llama":
            sd[p + "attn.q.weight"] = _unpermute(tensors[b + "attn_q.weight"], cfg.n_heads)
            sd[p + "attn.k.weight"] = _unpermute(tensors[b + "attn_k.weight"], cfg.kv_heads)
    model = build_model(cfg, seed=None)
    model.load_state_dict(sd, strict=True)
    if "rope_freqs.weight" in tensors:  # Llama-3 scaling: divide each frequency as llama.cpp does
        inv = rope_inv_freq(cfg) / tensors["rope_freqs.weight"]
        pos = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
        model.rope_cos, model.rope_sin = emb.cos(), emb.sin()
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python), when installed


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppRunner:
    """llama.cpp on a GGUF file: ids -> (T, vocab) logits of every position, and its own tokenizer."""

    def __init__(self, path: Path | str, n_ctx: int, threads: int = 0) -> None:
        self.llm = self.load(
            path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32: an f16 KV cache (llama.cpp's default) would blur the weights' check
            type_v=0,
            n_threads=threads or os.cpu_count() or 1,
            verbose=False,
        )

    @staticmethod
    def load(path: Path | str, **kwargs: Any) -> Any:
        """`llama_cpp.Llama(path, **kwargs)` without llama.cpp's extra weight buffer types (CPU_REPACK, AMX).

        Its plain CPU kernels are the ones checked, and on AMX CPUs (Sapphire Rapids and later) the AMX
        quantized matmul of the llama.cpp vendored by llama-cpp-python 0.3.36 loads a half-initialised tile
        config (`ldtilecfg` on stack garbage): a SIGSEGV or not, depending on what the stack held. `Llama()`
        takes no `use_extra_bufts`, so the default model params are adjusted while it loads.
        """
        import llama_cpp.llama_cpp as lib
        from llama_cpp import Llama

        default_params = lib.llama_model_default_params

        def model_params() -> Any:
            params = default_params()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = model_params
        try:
            return Llama(model_path=str(path), **kwargs)
        finally:
            lib.llama_model_default_params = default_params

    def __call__(self, ids: Any) -> np.ndarray:
        ids = [int(i) for i in ids]
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        self.llm.close()


__all__ = [
    "GGUF_TYPES",
    "LlamaCppRunner",
    "check_supported",
    "gguf_arch",
    "gguf_tensors",
    "llama_cpp_available",
    "read_gguf",
    "read_metadata",
    "read_tensors",
    "write_gguf",
]
