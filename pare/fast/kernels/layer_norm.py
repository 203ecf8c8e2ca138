"""LayerNorm over the last axis, which can also write its input plus a bias: the residual stream
that the next projection's GEMM accumulates into.

Replaces: `nn.LayerNorm` (norm1, norm2, norm3) in `pare/models/transformer.py BasicTransformerBlock`,
with `shift` the bias of the projection whose output is added back after the sub-layer (see
`pare/fast/transformer.py FastBasicTransformerBlock`).
Source: Ba, Kiros & Hinton, Layer Normalization (arXiv 1607.06450, eq. 4):
    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, the moments over the channels of one token.

Why a kernel: each row is read once into registers and both outputs are written from there: the
normalised row and, with `shift`, x + shift. In the reference the sub-layer's residual add
(`attn(norm(x)) + x`) is a pass of its own, which reads two tensors and writes one; here the
GEMM's epilogue does it (beta = 1 over the shifted residual), so that pass is gone.
Arithmetic in float32 (two passes over the row held in registers), one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._layer_norm_triton import layer_norm as layer_norm_kernel

TILE = 4096  # values per program: several rows (measured a little faster than 8192: benchmarks/NOTES.md)
MAX_C = 8192  # longer rows run `reference`


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same function in plain PyTorch: the CPU path, and what the kernel is tested against."""
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y, (None if shift is None else x + shift)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(LayerNorm(x), x + shift or None), both contiguous. x: (..., C); weight, bias, shift: (C,). On CUDA
    with Triton the kernel runs; elsewhere `reference`."""
    c = x.shape[-1]
    x = x.contiguous()  # a no-op on the fast path, where tokens are channels-last maps; r must be contiguous
    if not (triton_ready(x) and weight is not None and bias is not None and c <= MAX_C):
        return reference(x, weight, bias, eps, shift)
    rows = x.numel() // c
    c_p = triton.next_power_of_2(c)
    block_rows = max(1, TILE // c_p)
    y = torch.empty_like(x)
    r = torch.empty_like(x) if shift is not None else y  # y: a dummy pointer when there is no shift
    layer_norm_kernel[(triton.cdiv(rows, block_rows),)](
        x, weight, bias, y, shift if shift is not None else bias, r, rows, c, eps,
        C_P=c_p, BLOCK_ROWS=block_rows, HAS_SHIFT=shift is not None, num_warps=4 if block_rows * c_p <= 4096 else 8)
    return y, (r if shift is not None else None)
