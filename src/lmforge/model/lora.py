"""LoRA and QLoRA adapters on the lmforge `Transformer`, saved and loaded in PEFT's format.

    from lmforge.model.lora import LoraConfig, apply_lora, save_adapter, merge_lora
    stats = apply_lora(model, LoraConfig(rank=16, alpha=32), quantize_base=True)  # QLoRA: NF4 base
    ...train: only lora_A / lora_B require grad...
    save_adapter(model, cfg, Path("out/adapter"), base_model="path/to/base")     # peft.PeftModel loads it
    merge_lora(model)                                                            # plain nn.Linear again

LoRA (Hu et al. 2021): a frozen Linear W gets a trainable low-rank update, y = W x + s * B (A x), with
A (r, in) Kaiming-uniform and B (out, r) zeros, so training starts from the base model exactly. The scale s
is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). QLoRA (Dettmers et al. 2023) stores
the frozen W in NF4 (`lmforge.model.nf4`). Targets are fnmatch patterns matched against the end of module
names: "attn.q" adapts every layer's query projection, "layers.0.*" everything in layer 0.

PEFT's format: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<HF module path>.lora_{A,B}.weight`; module paths come from the key maps in hf.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmforge.config import Section
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json, read_json_object
from lmforge.model.hf import hf_architecture, rules_for
from lmforge.model.nf4 import NF4Linear
from lmforge.model.tensorfile import load_tensors, save_tensors
from lmforge.model.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

DEFAULT_TARGETS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="Rank r of each update B @ A; higher = more capacity, more memory")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (training only)")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="fnmatch patterns matched against the end of Linear module names, e.g. attn.q, "
        "layers.*.mlp.down, layers.0.*",
    )
    rslora: bool = Field(False, description="rsLoRA: scale = alpha / sqrt(rank) instead of alpha / rank")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraLinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))); `base` is a frozen nn.Linear or NF4Linear."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, scale
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.dtype
        device = base.weight.device if isinstance(base, nn.Linear) else base.packed.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # set by `adapters_disabled`

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # PEFT's default init: A like nn.Linear's weight (Kaiming uniform, a=sqrt(5)), B zeros.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.base(x)
        if self.disabled:
            return y
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        if y.dtype != a.dtype:
            return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)
        # One kernel for y + scale * a @ B^T: no separate scale and add passes over the (..., out) output.
        out = torch.addmm(
            y.reshape(-1, self.out_features), a.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scale
        )
        return out.view(y.shape)

    def delta_weight(self) -> Tensor:
        """scale * B @ A, shape (out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def base_weight(self) -> Tensor:
        return self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantized_weight()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


# ---------------------------------------------------------------------------------------------------------
# Applying, inspecting, merging


def _linear_names(model: nn.Module) -> list[str]:
    # The LM head is not adaptable: the model reads `output.weight` directly (shared with tied embeddings).
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"]


def _matches(name: str, pattern: str) -> bool:
    return fnmatch(name, pattern) or fnmatch(name, "*." + pattern)


def _suffixes(names: list[str]) -> list[str]:
    """layers.3.attn.q -> attn.q: the short names a user writes, in model order."""
    out: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        out[".".join(parts[2:]) if parts[0] == "layers" and len(parts) > 2 else n] = None
    return list(out)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def select_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The Linear module names matched by `targets`; a pattern that matches nothing is a ConfigError."""
    names = _linear_names(model)
    unmatched = [p for p in targets if not any(_matches(n, p) for n in names)]
    if unmatched:
        raise ConfigError(
            f"lora.targets: {unmatched} match no Linear module; valid names (matched at the end, fnmatch "
            f"patterns allowed): {', '.join(_suffixes(names))} (full names like {names[0]})"
        )
    return [n for n in names if any(_matches(n, p) for p in targets)]


def apply_lora(
    model: nn.Module, cfg: LoraConfig, *, quantize_base: bool = False, seed: int = 0
) -> dict[str, int | float]:
    """Freeze every base parameter and wrap the targeted Linears in LoraLinear (NF4 base if quantize_base)."""
    if lora_modules(model):
        raise ConfigError(
            "the model already has LoRA adapters; merge them (merge_lora) before adding new ones"
        )
    names = select_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        base: nn.Linear | NF4Linear = NF4Linear.from_linear(linear) if quantize_base else linear
        lora = LoraLinear(base, cfg.rank, cfg.scale, cfg.dropout)
        if lora.lora_A.device.type == "cpu":
            lora.reset_parameters(gen)
        else:  # generators are per device: draw on CPU so the init does not depend on the device
            a = torch.empty_like(lora.lora_A, device="cpu")
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            lora.lora_A.data.copy_(a)
        _set_module(model, name, lora)
    return trainable_summary(model)


def trainable_summary(model: nn.Module) -> dict[str, int | float]:
    """Trainable / total parameter counts; an NF4 weight counts as its number of weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA tensors, keyed `<module>.lora_A` / `<module>.lora_B` (lmforge names)."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def load_adapter_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy LoRA tensors in; every missing, unexpected or mis-shaped key is listed by name."""
    own = adapter_state_dict(model)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(t.shape)})"
        for k, t in own.items()
        if k in sd and sd[k].shape != t.shape
    ]
    problems = [f"{label}: {', '.join(v)}" for label, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)) if v]  # fmt: skip
    if problems:
        raise DataError("adapter does not match the model's LoRA modules: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k])


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes the base model only (e.g. DPO's reference policy)."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(mods, before, strict=True):
            m.disabled = b


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """In place: each LoraLinear -> nn.Linear with W + scale * B @ A (an NF4 base is dequantized first)."""
    for name, m in lora_modules(model).items():
        w = m.base_weight()
        merged = nn.Linear(
            m.in_features, m.out_features, bias=m.base.bias is not None, device=w.device, dtype=w.dtype
        )
        merged.weight.copy_(w + m.delta_weight().to(w.dtype))
        if m.base.bias is not None and merged.bias is not None:
            merged.bias.copy_(m.base.bias)
        merged.requires_grad_(False)
        _set_module(model, name, merged)
    return model


# ---------------------------------------------------------------------------------------------------------
# PEFT format


def _hf_module_map(model: nn.Module) -> tuple[str, dict[str, str], set[str]]:
    """(HF architecture, our Linear module name -> HF module path, our modules that HF stores transposed).

    Our modules that HF fuses (GPT-2's c_attn packs q, k, v) are absent: a LoRA on the fused matrix is not
    the same function as three separate ones."""
    if not isinstance(model, Transformer):
        raise ConfigError(f"PEFT adapters need an lmforge Transformer, got {type(model).__name__}")
    arch = hf_architecture(model.cfg)
    mapping: dict[str, str] = {}
    transposed: set[str] = set()
    for rule in rules_for(model.cfg, arch):
        if len(rule.ours) != 1 or not rule.ours[0].endswith(".weight"):
            continue
        ours = rule.ours[0].removesuffix(".weight")
        mapping[ours] = rule.hf.removesuffix(".weight")
        if rule.kind == "transpose":
            transposed.add(ours)
    return arch, mapping, transposed


def _peft_names(model: nn.Module) -> tuple[dict[str, str], bool]:
    """Our adapted module -> HF path, and fan_in_fan_out; refuses modules PEFT cannot express."""
    arch, mapping, transposed = _hf_module_map(model)
    adapted = list(lora_modules(model))
    if not adapted:
        raise ConfigError("the model has no LoRA adapters (apply_lora first)")
    fused = [n for n in adapted if n not in mapping]
    if fused:
        raise ConfigError(
            f"{arch} fuses {', '.join(fused[:3])}{' ...' if len(fused) > 3 else ''} with other projections in one "
            "HF tensor (GPT-2's c_attn), so the adapter has no PEFT equivalent; target attn.o, mlp.up, mlp.down"
        )
    kinds = {n in transposed for n in adapted}
    if len(kinds) > 1:
        raise ConfigError(
            "PEFT's fan_in_fan_out is one flag per adapter: do not mix Conv1D and Linear targets"
        )
    return {n: mapping[n] for n in adapted}, kinds.pop()


def _target_modules(mapping: dict[str, str], all_hf: list[str]) -> list[str]:
    """PEFT's target_modules: HF leaf names (q_proj, ...) when they select exactly the adapted modules,
    else the full module paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in mapping.values()})
    selected = {p for p in all_hf if p.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(mapping.values()) else sorted(mapping.values())


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: Path, *, base_model: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format into `out_dir` (created)."""
    mapping, fan_in_fan_out = _peft_names(model)
    _, all_map, _ = _hf_module_map(model)
    peft_cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": _target_modules(mapping, list(all_map.values())),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    sd = adapter_state_dict(model)
    tensors = {}
    for ours, hf in mapping.items():
        for ab in ("lora_A", "lora_B"):
            tensors[f"{_PEFT_PREFIX}{hf}.{ab}.weight"] = sd[f"{ours}.{ab}"].cpu().contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(out_dir / ADAPTER_CONFIG, peft_cfg)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    d = read_json_object(path, "a PEFT adapter folder has adapter_config.json")
    unsupported = {
        "peft_type": (d.get("peft_type"), "LORA"),
        "bias": (d.get("bias", "none"), "none"),
        "use_dora": (bool(d.get("use_dora")), False),
        "modules_to_save": (d.get("modules_to_save") or None, None),
        "rank_pattern": (d.get("rank_pattern") or {}, {}),
        "alpha_pattern": (d.get("alpha_pattern") or {}, {}),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise DataError(f"{path}: {key}={got!r} is not supported (expected {want!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(d.get(key), int | float):
            raise DataError(f"{path}: {key} missing or not a number")
    return d


def load_adapter(model: nn.Module, adapter_dir: Path, *, quantize_base: bool = False) -> LoraConfig:
    """Load a PEFT LoRA folder onto `model`; applies LoRA to the adapted modules first if the model has none."""
    adapter_dir = Path(adapter_dir)
    d = read_adapter_config(adapter_dir)
    wpath = adapter_dir / ADAPTER_WEIGHTS
    if not wpath.exists():
        raise DataError(f"{wpath}: not found (PEFT adapters are read from safetensors only)")
    _, mapping, _ = _hf_module_map(model)
    to_ours = {hf: ours for ours, hf in mapping.items()}
    sd: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in load_tensors(wpath).items():
        k = key.removeprefix(_PEFT_PREFIX).replace(".default.", ".")
        hf, _, ab = k.removesuffix(".weight").rpartition(".")
        if ab not in ("lora_A", "lora_B") or hf not in to_ours:
            unknown.append(key)
            continue
        sd[f"{to_ours[hf]}.{ab}"] = tensor
    if unknown:
        raise DataError(f"{wpath}: tensors that match no module of this model: {', '.join(unknown[:5])}")
    adapted = sorted({k.rsplit(".", 1)[0] for k in sd}, key=list(mapping).index)
    short = _suffixes(adapted)  # attn.q rather than every layer's name, when that selects the same modules
    same = {n for n in mapping if any(_matches(n, p) for p in short)} == set(adapted)
    targets = short if same else adapted
    cfg = LoraConfig(
        rank=int(d["r"]),
        alpha=float(d["lora_alpha"]),
        dropout=float(d.get("lora_dropout") or 0.0),
        rslora=bool(d.get("use_rslora")),
        targets=list(targets),
    )
    present = lora_modules(model)
    if not present:
        apply_lora(model, cfg.model_copy(update={"targets": adapted}), quantize_base=quantize_base)
    else:
        for name, m in present.items():
            if not math.isclose(m.scale, cfg.scale):
                raise DataError(
                    f"{adapter_dir}: adapter scale {cfg.scale:g} != the model's {m.scale:g} at {name}"
                )
    load_adapter_state_dict(model, {k: v.to(_lora_dtype(model)) for k, v in sd.items()})
    return cfg


def _lora_dtype(model: nn.Module) -> torch.dtype:
    mods = list(lora_modules(model).values())
    return mods[0].lora_A.dtype if mods else torch.float32
