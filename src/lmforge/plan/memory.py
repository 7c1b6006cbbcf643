"""The memory model: bytes per device of weights, gradients, optimizer states, activations and buffers.

    setup = Setup(cfg, method="pretrain", seq_len=256, micro_batch=8, precision="fp32")
    memory(setup).peak                         # bytes the busiest moment of a step needs on one device

Activations are counted from what our Transformer's autograd graph actually saves (checked tensor by tensor
with saved-tensor hooks in the tests), per token and per block, with d = dim, f = hidden_dim, H = n_heads,
K = n_kv_heads, h = head_dim:

    llama block: x, h (block input, mid residual) 2d, RMSNorm fp32 outputs 2d, rstd 2, normed inputs of the
                 q/k/v and gate/up matmuls 2d, SDPA q, k, v, out 2(H + K)h (RoPE saves nothing: cos/sin are
                 buffers), SDPA log-sum-exp H, SwiGLU gate, silu(gate), up, product 4f
                 = 6d + 2(H+K)h + 4f + H + 2
    gpt2 block:  x, h 2d, LayerNorm mean/rstd 4, normed inputs 2d, q, k, v, out 4Hh, log-sum-exp H,
                 GELU input and output 2f  = 4d + 4Hh + 2f + H + 4
    LoRA adds the rank-r output of every adapter's A; activation checkpointing keeps only each block's
    input (d per token) and recomputes one block at a time in backward.
    logits and loss: logits, fp32 log-softmax (saved) and its gradient = 3 x V x 4 bytes per token.

Peak = weights + optimizer states + compute copies + max(activations + transients, gradients) (+ gradients
during accumulation, which outlive a micro batch). The gradient and the activation terms do not add up
because backward frees activations as it creates gradients (and the optimizer states already exist from
step 2 on). Bytes per parameter follow how lmforge trains, not an idealised scheme: fp32 parameters and
gradients with a bf16 autocast copy for mixed precision, or FSDP2 shards with bf16 all-gathered blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from lmforge.model.config import ModelConfig, embedding_params, layer_params, num_params

Method = Literal["pretrain", "full", "lora", "qlora"]
Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw8bit"]

NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64 weights (lmforge.model.nf4, no double quant)
GPU_OVERHEAD = 1.0 * 1024**3  # CUDA context, cuBLAS/NCCL workspaces: outside max_memory_allocated
GPU_FRAGMENTATION = 0.05  # caching-allocator slack on top of the allocated peak
CPU_OVERHEAD = 2.0 * 1024**3  # OS, Python, torch libraries on a CPU run
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Setup:
    """One candidate way to train: shape, method, batch, precision and parallelism on one device type."""

    cfg: ModelConfig
    method: Method = "pretrain"
    seq_len: int = 256
    micro_batch: int = 1
    accum: int = 1  # micro batches per optimizer step on each device
    precision: Precision = "fp32"
    optimizer: Optimizer = "adamw"
    checkpointing: bool = False
    world: int = 1  # data-parallel devices
    shard: Literal[0, 2, 3] = 0  # 0 = replicate (DDP), 2 = FSDP without resharding, 3 = FSDP resharding
    offload: bool = False  # FSDP CPU offload of parameters, gradients and optimizer states
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    device: Literal["gpu", "cpu"] = "gpu"

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    @property
    def act_bytes(self) -> int:
        """Bytes of matmul outputs / SDPA tensors: bf16/fp16 under autocast, else fp32."""
        return 2 if self.mixed else 4


@dataclass
class Memory:
    """Bytes on one device; `peak` is what must fit, `device_total` adds the runtime's own overhead."""

    weights: float = 0.0
    compute_copies: float = 0.0  # bf16 autocast weight cache, FSDP all-gathered blocks, NF4 dequantized
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0  # saved for backward with the chosen checkpointing
    activations_no_ckpt: float = 0.0
    activations_ckpt: float = 0.0
    logits: float = 0.0  # logits, log-softmax and its gradient
    transient: float = 0.0  # backward temporaries, unsharded FSDP gradients before reduce-scatter
    offloaded: float = 0.0  # bytes moved to host memory by CPU offload
    peak: float = 0.0
    overhead: float = 0.0
    device_total: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {k: float(v) if isinstance(v, int) else v for k, v in asdict(self).items()}


# -- parameter counts ------------------------------------------------------------------------------------
def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection in one block."""
    d, h, q, kv, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    shapes = {
        "q": (d, q * h),
        "k": (d, kv * h),
        "v": (d, kv * h),
        "o": (q * h, d),
        "up": (d, f),
        "down": (f, d),
    }
    if cfg.arch == "llama":
        shapes["gate"] = (d, f)
    return shapes


def lora_params(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Adapter parameters: r x (in + out) for every targeted projection of every block."""
    shapes = _linear_shapes(cfg)
    return cfg.n_layers * sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)


def target_params(cfg: ModelConfig, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Base weights under adapters (what QLoRA stores in 4 bits)."""
    return cfg.n_layers * sum(i * o for name, (i, o) in _linear_shapes(cfg).items() if name in targets)


def root_params(cfg: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, final norm, untied head (FSDP's root unit)."""
    return num_params(cfg) - cfg.n_layers * layer_params(cfg)


# -- activations ---------------------------------------------------------------------------------------
def block_activation_elems(cfg: ModelConfig) -> tuple[int, int]:
    """Saved elements per token of one block: (always fp32: residuals, norm internals, lse; matmul dtype)."""
    d, h, q, kv, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    if cfg.arch == "llama":
        fp32 = 2 * d + 2 * d + 2 + q  # x, h; RMSNorm fp32 outputs; rstd; SDPA log-sum-exp
        act = 2 * d + 2 * (q + kv) * h + 4 * f  # normed matmul inputs; q, k, v, out; SwiGLU
    else:
        fp32 = 2 * d + 4 + q  # x, h; LayerNorm mean and rstd; log-sum-exp
        act = 2 * d + 4 * q * h + 2 * f  # normed matmul inputs; q, k, v, out; GELU in/out
    return fp32, act


def final_norm_elems(cfg: ModelConfig) -> tuple[int, int]:
    d = cfg.dim
    return (2 * d + 1, d) if cfg.arch == "llama" else (d + 2, d)


def block_activation_bytes(s: Setup) -> float:
    """Bytes per token saved by one block (without checkpointing), LoRA's rank-r intermediates included."""
    fp32, act = block_activation_elems(s.cfg)
    lora = (
        s.lora_rank * sum(1 for t in s.lora_targets if t in _linear_shapes(s.cfg))
        if s.method
        in (
            "lora",
            "qlora",
        )
        else 0
    )
    return 4 * fp32 + s.act_bytes * (act + lora)


def backward_temp_bytes(s: Setup) -> float:
    """Gradient temporaries while one block runs backward, per token (input/output grads of the MLP)."""
    return s.act_bytes * (2 * s.cfg.hidden_dim + 2 * s.cfg.dim)


def activations(s: Setup, checkpointing: bool) -> float:
    """Bytes saved for backward per micro batch, at the start of backward."""
    tokens = s.micro_batch * s.seq_len
    fp32, act = final_norm_elems(s.cfg)
    final = 4 * fp32 + s.act_bytes * act
    if checkpointing:
        per_token: float = s.cfg.n_layers * 4 * s.cfg.dim + final  # each block's input, fp32 residual stream
    else:
        per_token = s.cfg.n_layers * block_activation_bytes(s) + final
    if s.method in ("lora", "qlora"):
        # Frozen norm weights need no saved normed output (llama: RMSNorm's fp32 output, 2 per block + the
        # final one), and block 0's first norm sees an input that needs no gradient, so it saves nothing.
        d = s.cfg.dim
        if s.cfg.arch == "llama":
            per_token -= 4 * ((0 if checkpointing else 2 * d * s.cfg.n_layers) + d)
        if not checkpointing:
            per_token -= 4 * (d + (1 if s.cfg.arch == "llama" else 2))
    return per_token * tokens


def logits_bytes(s: Setup) -> float:
    return 3 * 4 * s.cfg.vocab_size * s.micro_batch * s.seq_len


# -- the whole device ----------------------------------------------------------------------------------
def state_bytes(precision: str, optimizer: str) -> tuple[float, float, float]:
    """ZeRO's accounting per trained parameter: (weights, gradients, optimizer states) in bytes.

    Mixed precision: 2 + 2 + 12 (fp32 master copy + two fp32 moments), as in the ZeRO paper (Rajbhandari et
    al. 2020, 'K = 12'); fp32: 4 + 4 + 8. An 8-bit AdamW keeps the moments in 1 byte each."""
    moments = 2.0 if optimizer == "adamw8bit" else 8.0
    if precision == "fp32":
        return 4.0, 4.0, moments
    return 2.0, 2.0, 4.0 + moments


def zero_memory(
    n_params: float, stage: int, world: int, precision: str = "bf16", optimizer: str = "adamw"
) -> dict[str, float]:
    """Weights + gradients + optimizer bytes per device for ZeRO stage 0-3 (the paper's Figure 1)."""
    w, g, o = state_bytes(precision, optimizer)
    ws = world if stage >= 3 else 1
    gs = world if stage >= 2 else 1
    os_ = world if stage >= 1 else 1
    out = {"weights": w * n_params / ws, "gradients": g * n_params / gs, "optimizer": o * n_params / os_}
    out["total"] = sum(out.values())
    return out


def memory(s: Setup) -> Memory:
    cfg = s.cfg
    m = Memory()
    n = num_params(cfg)
    sharded = s.shard >= 2 and s.world > 1
    w_div = s.world if sharded else 1
    _state_memory(s, m, n, sharded, w_div)
    gathered = _parallel_memory(s, m, n, sharded)

    m.activations_no_ckpt = activations(s, False)
    m.activations_ckpt = activations(s, True)
    m.activations = m.activations_ckpt if s.checkpointing else m.activations_no_ckpt
    m.logits = logits_bytes(s)
    tokens = s.micro_batch * s.seq_len
    recompute = block_activation_bytes(s) * tokens if s.checkpointing else 0.0
    # The busiest moment of backward: either the loss's gradient (before any block has run backward) or a
    # block's backward (its recomputed activations, temporaries, gathered weights, unsharded gradients).
    fsdp_dyn = gathered + (m.transient if sharded else 0.0)
    backward = max(m.logits, recompute + backward_temp_bytes(s) * tokens + fsdp_dyn)

    if s.offload and sharded:
        m.offloaded = m.weights + m.gradients + m.optimizer
        m.weights = m.gradients = m.optimizer = 0.0
        m.notes.append("CPU offload: sharded parameters, gradients and Adam states live in host memory")

    grads_live = m.gradients
    if s.accum > 1 and sharded and s.method in ("pretrain", "full"):
        grads_live = n * 4.0  # FSDP keeps unsharded gradients while accumulating without sync
        m.notes.append("FSDP accumulation without sync keeps full-size gradients: prefer accumulation 1")
    static = m.weights + m.optimizer + m.compute_copies - gathered + (0.0 if sharded else m.transient)
    during = m.activations + backward + (grads_live if s.accum > 1 else 0.0)
    # The end of backward: nearly all gradients exist while block 0 still holds its activations and
    # temporaries, and the embedding's dense gradient is built before being added to the tied one.
    late = grads_live + block_activation_bytes(s) * tokens + backward_temp_bytes(s) * tokens
    if s.method in ("pretrain", "full"):
        late += cfg.vocab_size * cfg.dim * 4.0 / w_div
    m.peak = static + max(during, late, grads_live)
    if s.device == "gpu":
        m.overhead = GPU_OVERHEAD + GPU_FRAGMENTATION * m.peak
    else:
        m.overhead = CPU_OVERHEAD
    m.device_total = m.peak + m.overhead
    return m


def _state_memory(s: Setup, m: Memory, n: int, sharded: bool, w_div: int) -> None:
    """Weights, gradients, optimizer states and compute copies per device (before any CPU offload)."""
    cfg = s.cfg
    pb = 2.0 if s.mixed else 4.0  # bytes of a compute copy (bf16 under mixed precision)
    moments = 2.0 if s.optimizer == "adamw8bit" else 8.0
    if s.method in ("pretrain", "full"):
        m.weights = 4.0 * n / w_div  # fp32 parameters (the master copy under mixed precision)
        m.gradients = 4.0 * n / w_div
        m.optimizer = moments * n / w_div
        if s.mixed and not sharded:
            m.compute_copies = 2.0 * (n - embedding_params(cfg))  # autocast's bf16 weight cache
            m.notes.append("autocast keeps a bf16 copy of each matmul weight through forward and backward")
        return
    trained = lora_params(cfg, s.lora_rank, s.lora_targets)
    base_b = float(pb)  # frozen base loaded in the compute dtype
    if s.method == "qlora":
        tgt = target_params(cfg, s.lora_targets)
        m.weights = (tgt * NF4_BYTES + (n - tgt) * base_b) / w_div
        biggest = max(i * o for i, o in _linear_shapes(cfg).values())
        m.compute_copies = 2.0 * biggest * pb  # one dequantized weight + the dequantizer's temporary
    else:
        m.weights = n * base_b / w_div
    m.weights += trained * pb / w_div
    m.gradients = trained * pb / w_div
    m.optimizer = trained * (moments if s.optimizer == "adamw8bit" else 2 * pb) / w_div


def _parallel_memory(s: Setup, m: Memory, n: int, sharded: bool) -> float:
    """What FSDP gathers or DDP buckets add; returns the FSDP-3 gathered bytes, which live only while their
    block computes (not at the logits' peak)."""
    cfg = s.cfg
    pb = 2.0 if s.mixed else 4.0
    gathered = 0.0
    if sharded:
        block = layer_params(cfg)
        root = root_params(cfg)
        gathered_block = (
            block * pb
            if s.method in ("pretrain", "full")
            else block * (NF4_BYTES if s.method == "qlora" else pb)
        )
        if s.shard == 2:
            m.compute_copies += n * pb  # gathered once per forward, kept until backward
        else:
            gathered = 2 * gathered_block + root * pb  # current + prefetched block, and the root
            m.compute_copies += gathered
        if s.method in ("pretrain", "full"):
            # a block's (and the root's) unsharded gradient exists until its reduce-scatter
            m.transient += (block + root) * 4.0
        m.notes.append(f"FSDP shards parameters, gradients and optimizer states over {s.world} devices")
    elif s.world > 1 and s.method in ("pretrain", "full"):
        m.transient += 4.0 * n  # DDP's gradient buckets: a second copy of the gradients
        m.notes.append(
            "DDP allocates gradient buckets (a second copy of the gradients) when it wraps the model"
        )
    return gathered
