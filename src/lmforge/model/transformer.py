"""THE model: one decoder-only transformer for the Llama family (Llama, Mistral, Qwen2) and GPT-2.

    from lmforge.model.config import get_preset
    from lmforge.model.transformer import build_model
    model = build_model(get_preset("tiny"))            # built on meta, materialised, init_weights()
    logits = model(torch.randint(0, 2048, (2, 16)))   # (B, T, vocab) in the model's dtype

References: Llama (Touvron et al. 2023) and its HF implementation (rotate-half RoPE, SwiGLU, RMSNorm computed
in fp32), Llama-3 RoPE scaling, GQA (Ainslie et al. 2023), GPT-2 (Radford et al. 2019) and nanoGPT's init.

    x ─ tok_embeddings (+ pos_embeddings: gpt2) ─┬─> [Block] x n_layers ─> norm ─> output (or tied embedding) ─> logits
    Block:  h = x + attn(attn_norm(x))          attn: q,k,v proj -> RoPE (llama) -> SDPA causal (GQA) -> o proj
            y = h + mlp(mlp_norm(h))            mlp:  llama down(silu(gate(x)) * up(x)) | gpt2 down(gelu(up(x)))

Parameter names matter to other code: embeddings contain "embed" (no weight decay), blocks are `model.layers`
(wrapped from outside for activation checkpointing / FSDP), and the HF key table in hf.py maps these names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig

# `enable_gqa` exists from torch 2.5; older versions repeat k/v heads by hand.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


# ---------------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3 scaling if configured; same float ops as transformers."""
    hd = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)  # long wavelengths: slowed down
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled  # in between: interpolated
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_seq_len, head_dim), in fp32, in HF's rotate-half layout [f0..fn, f0..fn]."""
    inv = rope_inv_freq(cfg).to(device)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: HF's RoPE layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, hd); cos/sin: (T, hd) or (B, 1, T, hd), cast to x's dtype here (autocast)."""
    if cos.dtype != x.dtype:  # fp32 tables, bf16/fp16 activations
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------
# KV cache


class Cache(Protocol):
    """What `Transformer.forward` needs of a KV cache: the filled length (the next slot), the capacity,
    whether attention spans every slot (`static`), and `update`, which stores one layer's new keys/values
    and returns the keys/values to attend to."""

    length: int
    static: bool

    @property
    def max_len(self) -> int: ...

    def update(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class KVCache:
    """Preallocated keys/values per layer, (B, n_kv_heads, max_len, head_dim), plus the filled length.

    `forward(ids, kv_cache=cache)` writes the new keys at the slot tensor `cache_pos` (default
    [length, length + T)) and advances `length` after the last layer. Attention covers the filled slots
    (fastest on CPU) or, with `static=True`, all max_len slots under a mask: then every decode step has the
    same shapes, which a CUDA graph can capture.
    """

    k: list[Tensor]
    v: list[Tensor]
    length: int = 0
    static: bool = False

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ) -> KVCache:
        shape = (batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_size)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            static=static,
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, hd) at `slots` (T,); return the keys/values to attend to (B, Hkv, S, hd)."""
        # index_copy_: one op, cheaper per decode step than a slice assignment (measured, arange included)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        if self.static:
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]  # slots are [length, end) here
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


# ---------------------------------------------------------------------------------------------------------
# Fused projections (inference)


class Fused:
    """Linears that read the same input, run as one matmul: q;k;v and gate;up, 2 matmuls a block instead of 5.

    Their Parameters are re-pointed at row slices of one merged tensor, so nothing is stored twice and
    `load_state_dict` still writes through. It serves only without autograd (the slices are leaves of their
    own: no gradient would reach them) and while the Linears still hold those slices (quantization and LoRA
    swap the Linears out; `.to()` is caught by `Transformer._apply`); `FusionCheck` decides both once per
    forward.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.weight = _merge(linears, "weight")
        self.bias = _merge(linears, "bias") if linears[0].bias is not None else None
        self.slices = tuple(m.weight for m in linears)

    def __call__(self, x: Tensor) -> Tensor:
        """The Linears' outputs side by side, from one matmul (the caller checked that the slices hold)."""
        return F.linear(x, self.weight, self.bias)

    def holds(self, linears: Sequence[nn.Module]) -> bool:
        """The Linears still hold the slices (not swapped out, no new weight assigned)."""
        # `_parameters`, not `m.weight`: a quantized layer has no weight Parameter
        return all(m._parameters.get("weight") is w for m, w in zip(linears, self.slices, strict=True))

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy's Parameters are new tensors, no longer slices of `weight`: the copy is unfused


@torch.no_grad()
def _merge(linears: Sequence[nn.Linear], name: str) -> Tensor:
    merged = torch.cat([getattr(m, name).detach() for m in linears])
    row = 0
    for m in linears:
        p = getattr(m, name)
        setattr(m, name, nn.Parameter(merged[row : row + p.shape[0]], requires_grad=p.requires_grad))
        row += p.shape[0]
    return merged


class FusionCheck:
    """Whether a model's `Fused` groups serve this forward, decided once per forward instead of per block:
    autograd is off and every fused Linear, looked up through its owner as a swap would replace it, still
    holds its slice. One flat tuple of identity tests: a decode step of a small model is ~3 ms, and one
    check per group was ~2% of it."""

    def __init__(self, owners: Sequence[Attention | MLP]) -> None:
        entries: list[tuple[dict[str, Any], str, Tensor]] = []
        for owner in owners:
            assert owner.fused is not None
            mods, slices = owner._modules, owner.fused.slices
            entries += [(mods, n, w) for n, w in zip(owner.projections, slices, strict=True)]
        self.entries = tuple(entries)

    def active(self) -> bool:
        if torch.is_grad_enabled():
            return False
        # `_parameters`, not `.weight`: a quantized or LoRA layer has no weight Parameter. An owner whose
        # `fused` was dropped on its own falls back by itself (Attention/MLP check `fused is not None`).
        return all(mods[n]._parameters.get("weight") is w for mods, n, w in self.entries)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copy is unfused (see Fused.__deepcopy__)


def unfuse_projections(model: nn.Module) -> None:
    """Drop the merged tensors of `Transformer.fuse_projections` (before swapping or moving the Linears)."""
    for m in model.modules():
        if isinstance(m, (Attention, MLP)):
            m.fused = None
        elif isinstance(m, Transformer):
            m.fusion = None


# ---------------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the casts would be no-ops that still cost a dispatch each (~1 us)
            return self.weight * torch.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.dim, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.rope = cfg.arch == "llama"
        self.window = cfg.sliding_window
        qkv_bias = cfg.qkv_bias or cfg.arch == "gpt2"
        self.q = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=qkv_bias)
        self.k = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=qkv_bias)
        self.v = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=qkv_bias)
        self.o = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=cfg.arch == "gpt2")
        self.fused: Fused | None = None  # q;k;v, set by Transformer.fuse_projections
        self.projections = ("q", "k", "v")  # what `fused` merges

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        mask: Tensor | None,
        cache: Cache | None,
        layer: int,
        slots: Tensor | None = None,
        fused: bool = False,
    ) -> Tensor:
        """`fused`: run q;k;v as one matmul (the model's `FusionCheck` found it valid for this forward)."""
        B, T, _ = x.shape
        q, k, v = self._heads(x, cos, sin, fused)  # (B, heads, T, hd)
        if cache is not None:
            assert slots is not None
            k, v = cache.update(layer, k, v, slots)  # (B, Hkv, S, hd)
        if self.n_kv != self.n_heads and not _SDPA_GQA:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = {"enable_gqa": True} if self.n_kv != self.n_heads and _SDPA_GQA else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, **gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))  # (B, T, dim)

    def _heads(
        self, x: Tensor, cos: Tensor | None, sin: Tensor | None, fused: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, hd), k and v (B, Hkv, T, hd), RoPE applied to q and k."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        if fused and self.fused is not None:  # the Linears are not even looked up (slow module getattr)
            heads = self.fused(x).view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2 Hkv, T, hd)
            qk, v = heads.narrow(1, 0, H + Hkv), heads.narrow(1, H + Hkv, Hkv)
            if self.rope:  # q and k rotated together: half the elementwise ops of a decode step's RoPE
                assert cos is not None and sin is not None
                qk = apply_rope(qk, cos, sin)
            return qk.narrow(1, 0, H), qk.narrow(1, H, Hkv), v
        q = self.q(x).view(B, T, H, hd).transpose(1, 2)
        k = self.k(x).view(B, T, Hkv, hd).transpose(1, 2)
        v = self.v(x).view(B, T, Hkv, hd).transpose(1, 2)
        if self.rope:
            assert cos is not None and sin is not None
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gpt2 = cfg.arch == "gpt2"
        self.gate = None if self.gpt2 else nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=self.gpt2)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=self.gpt2)
        self.fused: Fused | None = None  # gate;up, set by Transformer.fuse_projections
        self.projections = ("gate", "up")  # what `fused` merges

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if self.gpt2:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        if fused and self.fused is not None:
            g, u = self.fused(x).chunk(2, dim=-1)
        else:
            assert self.gate is not None
            g, u = self.gate(x), self.up(x)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        mask: Tensor | None = None,
        cache: Cache | None = None,
        layer: int = 0,
        slots: Tensor | None = None,
        fused: bool = False,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, slots, fused)
        return x + self.mlp(self.mlp_norm(x), fused)


# ---------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    cfg: ModelConfig
    rope_cos: Tensor  # (max_seq_len, head_dim) fp32 buffers, llama only
    rope_sin: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fusion: FusionCheck | None = None  # set by fuse_projections
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        # Tied: no separate head; forward multiplies by tok_embeddings.weight (one Parameter, FSDP-safe).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.arch == "llama":  # fp32 tables, not saved: rebuilt by init_buffers() after to_empty/load
            cos, sin = rope_tables(cfg, device=self.tok_embeddings.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-persistent RoPE tables (needed after `to_empty`, which leaves them garbage)."""
        if self.cfg.arch == "llama":
            cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """Every tensor's initialisation, in one place (GPT-2 / nanoGPT scheme):

        - tok_embeddings, pos_embeddings, q/k/v, mlp gate/up, untied output: normal(0, init_std)
        - attn.o and mlp.down (write into the residual stream): normal(0, init_std / sqrt(2 * n_layers)),
          so the residual's variance does not grow with depth
        - all biases: 0; norm weights: 1 (LayerNorm bias 0)
        - RoPE tables: recomputed (init_buffers)
        `seed=None` draws from torch's global RNG instead of a private generator.
        """
        device = self.tok_embeddings.weight.device
        meta = device.type == "meta"  # shapes only (e.g. reading a run's model shape): nothing to draw
        gen = None if seed is None or meta else torch.Generator(device=device).manual_seed(seed)
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.normal_(0.0, resid_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        self.init_buffers()

    def fuse_projections(self) -> bool:
        """Run q/k/v and gate/up as one matmul each whenever autograd is off (see `Fused`); True if fused.

        Llama blocks of plain Linears only (not LoRA, quantized or sharded ones). Parameter names and the
        state_dict stay as they are. A model already fused keeps its merged tensors.
        """
        if self.cfg.arch != "llama":
            return False
        blocks: list[Any] = list(self.layers)
        groups: list[tuple[Any, tuple[Any, ...]]] = [(b.attn, (b.attn.q, b.attn.k, b.attn.v)) for b in blocks]
        groups += [(b.mlp, (b.mlp.gate, b.mlp.up)) for b in blocks]
        linears = [m for _, mods in groups for m in mods]
        if not all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in linears):
            return False
        for owner, mods in groups:
            if owner.fused is None or not owner.fused.holds(mods):
                owner.fused = Fused(mods)
        self.fusion = FusionCheck([owner for owner, _ in groups])
        return True

    def _apply(self, fn: Any, recurse: bool = True) -> Transformer:
        unfuse_projections(self)  # moving or casting gives the parameters new storage: merged copies go stale
        return cast(Transformer, super()._apply(fn, recurse))

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        kv_cache: Cache | None = None,
        attn_mask: Tensor | None = None,
        *,
        cache_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in the model's dtype; (B, 1, vocab) with `last_only`.

        position_ids (B, T): defaults to [start, start + T) with start = kv_cache.length (0 without a cache).
        kv_cache: the new keys/values go to the cache slots `cache_pos` (T,) (default [start, start + T)) and
        attention covers what the cache returns: the slots filled so far, or all slots of a static cache.
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to (B, H, T, S) with
        S = the attended slots; it replaces the causal mask (the caller supplies causality).
        last_only: only the last position goes through the output head (what generation needs).
        """
        x = self.features(
            input_ids, position_ids, kv_cache, attn_mask, cache_pos=cache_pos, last_only=last_only
        )
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, weight)  # (B, T, vocab)

    def features(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        kv_cache: Cache | None = None,
        attn_mask: Tensor | None = None,
        *,
        cache_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The final hidden states, after the final norm (B, T, dim): what the output head reads (and what
        `lmforge serve`'s /v1/embeddings mean-pools). Arguments as `forward`."""
        T = input_ids.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        end = start + T
        self._check_length(end, kv_cache, position_ids)
        x, cos, sin = self._embed(input_ids, position_ids, start, end)  # (B, T, dim)
        if cos is not None and sin is not None and cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 tables: cast once, not in every block
        slots = None
        if kv_cache is not None:
            slots = cache_pos if cache_pos is not None else torch.arange(start, end, device=x.device)
        mask = attn_mask if attn_mask is not None else self._mask(T, start, kv_cache, slots, x.device)
        fused = self.fusion is not None and self.fusion.active()
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, kv_cache, i, slots, fused)
        if kv_cache is not None:
            kv_cache.length = end
        return self.norm(x[:, -1:] if last_only else x)

    def _check_length(self, end: int, cache: Cache | None, position_ids: Tensor | None) -> None:
        limit = self.cfg.max_seq_len
        if cache is not None:
            # Explicit positions may sit below their slots (left-padded rows): then only the cache bounds them.
            limit = cache.max_len if position_ids is not None else min(limit, cache.max_len)
        if end > limit:
            raise ValueError(f"sequence of {end} positions exceeds the limit of {limit}")

    def _embed(
        self, input_ids: Tensor, position_ids: Tensor | None, start: int, end: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Token embeddings plus learned positions (gpt2), or with the RoPE rows of the positions (llama)."""
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        if self.pos_embeddings is not None:
            pos = self.pos_embeddings.weight[start:end] if position_ids is None else None
            return x + (self.pos_embeddings(position_ids) if pos is None else pos), None, None
        if position_ids is None:
            return x, self.rope_cos[start:end], self.rope_sin[start:end]  # (T, hd)
        return (
            x,
            self.rope_cos[position_ids].unsqueeze(1),
            self.rope_sin[position_ids].unsqueeze(1),
        )  # (B, 1, T, hd)

    def _mask(
        self, T: int, start: int, cache: Cache | None, slots: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """None when plain causal attention (SDPA is_causal) is right; else a bool (T, S) mask, True = attend.

        S is what the cache returns: the filled slots, or all of a static cache's (the unfilled ones lie
        after every query, so causality hides them).
        """
        static = cache is not None and cache.static
        S = cache.max_len if cache is not None and static else start + T
        window = self.cfg.sliding_window
        needs_window = window is not None and window < S
        if (start == 0 or T == 1) and not needs_window and not static:
            return None  # T == 1 with a cache attends to everything; start == 0 is plain causal
        qpos = slots if slots is not None else torch.arange(start, start + T, device=device)
        kpos = torch.arange(S, device=device)[None, :]
        allowed = kpos <= qpos[:, None]
        if needs_window:
            assert window is not None
            allowed &= kpos > qpos[:, None] - window
        return allowed


def build_model(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> Transformer:
    """Build on the meta device (no memory, no wasted init), materialise on `device`, then `init_weights`.

    `seed=None` skips init_weights (for loading a checkpoint right after); the RoPE tables are still built.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.to(dtype=dtype)
    if hasattr(model, "rope_cos"):  # keep RoPE tables in fp32 whatever the weights' dtype
        model.rope_cos = model.rope_cos.float()
        model.rope_sin = model.rope_sin.float()
    if seed is None:
        model.init_buffers()
    else:
        model.init_weights(seed)
    return model


@torch.no_grad()
def generate_greedy(model: Transformer, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Minimal greedy decoding with the KV cache (for parity tests; the sampling engine lives in infer/)."""
    B, T = input_ids.shape
    p = next(model.parameters())
    cache = KVCache.empty(model.cfg, B, T + max_new_tokens, device=p.device, dtype=p.dtype)
    logits = model(input_ids, kv_cache=cache)
    out = [input_ids]
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = model(nxt, kv_cache=cache)
    return torch.cat(out, dim=1)
