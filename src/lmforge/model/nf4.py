"""NormalFloat4 (NF4) weights: the 4-bit data type of QLoRA (Dettmers et al. 2023), implemented in torch.

    from lmforge.model.nf4 import NF4Linear, quantize_nf4, dequantize_nf4
    packed, absmax = quantize_nf4(w)                      # 2 codes per byte + one fp32 absmax per 64 weights
    w_hat = dequantize_nf4(packed, absmax, w.shape)       # equals bitsandbytes' dequantize_4bit(..., "nf4")
    layer = NF4Linear.from_linear(linear)                 # frozen 4-bit weight, forward in the input's dtype

Each block of `block_size` consecutive weights (row-major) is scaled by its absolute maximum into [-1, 1]
and every value is rounded to the nearest of 16 levels (the quantiles of a standard normal, with an exact
zero). Codes are packed high nibble first, as bitsandbytes does, so packed codes and absmax are
interchangeable with `bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`. No double
quantization: absmax stays fp32, so storage is 4 + 32/block_size bits per weight (4.5 at block 64,
28.125% of fp16).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The NF4 levels as bitsandbytes stores them (QLoRA paper, appendix E), sorted ascending.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# Rounding to the nearest level = bucketizing by the midpoints between neighbours.
_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
# Every byte -> its two levels (high nibble first): dequantizing is then one gather.
_PAIRS = torch.stack([NF4_CODEBOOK[torch.arange(256) >> 4], NF4_CODEBOOK[torch.arange(256) & 0xF]], dim=1)


def storage_bytes(numel: int, block_size: int = 64) -> int:
    """Bytes of packed codes + fp32 absmax for `numel` weights."""
    return math.ceil(numel / 2) + 4 * math.ceil(numel / block_size)


def quantize_nf4(w: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """w (any shape) -> (packed uint8 codes, shape (ceil(numel/2),); absmax fp32, shape (ceil(numel/block),))."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / block_size)
    padded = F.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)  # zeros change no absmax
    absmax = padded.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide) to round exactly like bitsandbytes.
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    codes = torch.bucketize(scaled, _MIDPOINTS.to(w.device), out_int32=True).to(torch.uint8)
    codes = codes[: n + n % 2]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.contiguous(), absmax.contiguous()


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    shape: torch.Size | tuple[int, ...],
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of `quantize_nf4`: level * absmax of the block, computed in fp32, returned as `dtype`."""
    n = math.prod(shape)
    # index_select with int32 indices: ~10x faster on CPU than advanced indexing with int64.
    values = torch.index_select(_PAIRS.to(packed.device), 0, packed.int()).view(-1)  # (2 * len(packed),)
    blocks = absmax.numel()
    if values.numel() != blocks * block_size:  # a partial last block
        values = F.pad(values, (0, blocks * block_size - values.numel()))
    out = values.view(blocks, block_size) * absmax.float().unsqueeze(1)
    if out.numel() != n:
        out = out.view(-1)[:n]
    return out.view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized on the fly; saves only the 4-bit codes for backward, not W."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored as NF4 (buffers `packed`, `absmax`) plus an optional bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.dtype = dtype  # of the weight this replaced: `dequantized_weight()` returns it
        n = in_features * out_features
        self.register_buffer("packed", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(math.ceil(n / block_size), device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), False) if bias else None
        )

    packed: Tensor
    absmax: Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> NF4Linear:
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            dtype=w.dtype,
            device=w.device,
        )
        layer.packed, layer.absmax = quantize_nf4(w, block_size)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        # model.to(bf16) must not round absmax (the scales are part of the code, like `packed`): keep it
        # fp32 and follow only the device; the dequantized weight follows the new dtype.
        absmax = self.absmax
        super()._apply(fn, recurse)
        self.absmax = absmax.to(self.packed.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=absmax.device)).dtype
        return self

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        shape = self.weight_shape
        return dequantize_nf4(self.packed, self.absmax, shape, self.block_size, dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"
        )
