"""NF4: codes and absmax identical to bitsandbytes, storage math, and the frozen 4-bit Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.nf4 import NF4_CODEBOOK, NF4Linear, dequantize_nf4, quantize_nf4, storage_bytes

bnbf = pytest.importorskip("bitsandbytes.functional")


def test_codebook_equals_bitsandbytes() -> None:
    assert NF4_CODEBOOK.shape == (16,)
    assert torch.equal(NF4_CODEBOOK, bnbf.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[7] == 0 and NF4_CODEBOOK[15] == 1


@pytest.mark.parametrize("shape", [(128, 64), (96, 33), (7,), (3, 5, 40)])
def test_round_trip_identical_to_bitsandbytes(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    w.view(-1)[5] = 0.3  # an outlier: its block's other values collapse towards zero, as in bnb
    packed, absmax = quantize_nf4(w)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(packed, q.reshape(-1))
    assert torch.equal(absmax, state.absmax)
    ours = dequantize_nf4(packed, absmax, w.shape)
    theirs = bnbf.dequantize_4bit(q, state)
    assert ours.shape == w.shape
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))  # exact, not just within 1e-6


def test_round_trip_error_bound() -> None:
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    packed, absmax = quantize_nf4(w)
    err = (dequantize_nf4(packed, absmax, w.shape) - w).abs().view(-1, 64)
    half_gap = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max() / 2)  # widest rounding interval
    assert bool((err <= absmax.unsqueeze(1) * half_gap + 1e-7).all())
    rel_rms = float(err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert 0.05 < rel_rms < 0.12  # 4 bits per weight on a normal distribution: ~9% RMS error


def test_storage_is_28_percent_of_fp16() -> None:
    linear = nn.Linear(256, 512, bias=False)
    layer = NF4Linear.from_linear(linear)
    nbytes = (
        layer.packed.numel() * layer.packed.element_size()
        + layer.absmax.numel() * layer.absmax.element_size()
    )
    assert nbytes == storage_bytes(256 * 512) == 256 * 512 // 2 + 4 * 256 * 512 // 64 == 73728
    ratio = nbytes / (256 * 512 * 2)
    assert ratio == 0.28125 and ratio <= 0.30  # 4.5 bits per weight vs 16


def test_nf4_linear_forward_backward_and_state_dict(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    layer = NF4Linear.from_linear(linear)
    w = layer.dequantized_weight()
    assert w.shape == (48, 64) and w.dtype == torch.float32
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, w) + linear.bias.detach())
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, w) + linear.bias.detach()).square().sum().backward()
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert layer(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16
    # Plain tensors: safetensors saves and restores the layer exactly.
    save_file(layer.state_dict(), str(tmp_path / "nf4.safetensors"))
    fresh = NF4Linear(64, 48, bias=True)
    fresh.load_state_dict(load_file(str(tmp_path / "nf4.safetensors")))
    assert torch.equal(fresh(x.detach()), layer(x.detach()))


def test_to_dtype_keeps_codes_and_fp32_scales() -> None:
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=True))
    packed, absmax = layer.packed.clone(), layer.absmax.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.packed, packed) and layer.absmax.dtype == torch.float32
    assert torch.equal(layer.absmax, absmax)  # not rounded to bf16
    assert layer.dtype == torch.bfloat16 and layer.dequantized_weight().dtype == torch.bfloat16
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
