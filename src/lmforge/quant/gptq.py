"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): int4 codes for one weight that minimise the layer's output error on calibration inputs.

    H = hessian(X)                                    # X: (n, K) inputs the layer saw, H = 2/n X^T X
    q, scale, zero = gptq_int4(W, H, group_size=128)  # codes in the Int4Linear format
    output_error(W, W_hat, H)                         # ||W X^T - W_hat X^T||^2 / n, from H alone

Columns are quantized one at a time; the error each one leaves, divided by the matching diagonal entry of
the upper Cholesky factor of H^-1, is spread over the columns not yet quantized (block-wise: updates inside
a block of 128 columns are immediate, the rest are applied once per block, as in the paper's algorithm 1).
H is damped by `damp` x mean(diag H) so the Cholesky factorization exists. With `act_order`, columns go in
order of decreasing diag(H) (the most active inputs first, while there is still freedom to compensate);
the group scales are then fixed up front from the original weight ("static groups"), so the stored format
stays plain consecutive groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.model.quant import int4_params


def hessian(x: Tensor) -> Tensor:
    """2/n X^T X in fp32 for inputs x (..., K)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2.0 * x.T @ x / max(x.shape[0], 1)


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """Mean squared output error ||(W - W_hat) x||^2 over the calibration inputs, computed as tr(D H D^T) / 2."""
    d = (w.float() - w_hat.float()).to(h.dtype)
    return float(((d @ h) * d).sum() / 2)


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    gidx = torch.arange(q.shape[1], device=q.device) // group_size
    return (q.float() - zero[:, gidx]) * scale[:, gidx]


@torch.no_grad()
def gptq_int4(
    w: Tensor,
    h: Tensor,
    *,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 (N, K), scale fp32 (N, G), zero fp32 (N, G)) for weight w (N, K) and Hessian h (K, K)."""
    W = w.detach().float().clone()
    N, K = W.shape
    H = h.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = act_order  # group parameters from the original weight, so groups stay consecutive on disk
    scale = torch.empty(N, -(-K // group_size), device=W.device)
    zero = torch.empty_like(scale)
    if static:
        scale, zero = int4_params(W, group_size)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=W.device)
    # Upper Cholesky factor of H^-1: row i holds the coefficients that spread column i's error.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    # Blocks of whole groups, so a group's parameters are found from already-updated columns.
    block = max(group_size, block_size // group_size * group_size)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1, Err1, Hinv1 = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device), Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if not static and col % group_size == 0:
                g = col // group_size
                s, z = int4_params(W1[:, i : i + group_size], group_size)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            g = int(perm[col]) // group_size
            s, z = scale[:, g], zero[:, g]
            wcol = W1[:, i]
            qcol = torch.round(wcol / s + z).clamp_(0, 15)
            Q[:, col] = qcol.to(torch.uint8)
            err = (wcol - (qcol - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]

    inv = torch.argsort(perm)
    return Q[:, inv], scale, zero


__all__ = ["dequantize_codes", "gptq_int4", "hessian", "output_error"]
