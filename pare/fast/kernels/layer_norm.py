"""LayerNorm over the last axis, optionally after a residual add whose sum it also writes.

Replaces: in `pare/models/transformer.py BasicTransformerBlock`, `norm1(x)`, and the residual add
before `norm2` and `norm3` together with that norm: h = attn(...) + x, then norm(h). The add may
also be a bias (C,): the conv proj_in's, before the first block's norm1. See
`pare/fast/transformer.py FastBasicTransformerBlock`.
Source: Ba, Kiros & Hinton, Layer Normalization (arXiv 1607.06450, eq. 4):
    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias, the moments over the channels of one token.

Why a kernel: in the reference the residual add is a pass of its own (read two tensors, write one)
and the norm reads its result back. Here each row is read once into registers: the sum is rounded
to the input dtype and written (the residual stream, as the reference rounds it), and the
normalised row is computed from it and written. Arithmetic in float32 (two passes over the row held
in registers), one rounding to the output dtype.
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
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in plain PyTorch: the CPU path, and what the kernel is tested against."""
    h = x if residual is None else x + residual
    return h, F.layer_norm(h, h.shape[-1:], weight, bias, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, LayerNorm(h)) for h = x, or h = x + residual. x: (..., C); residual: (..., C), or (C,), a bias added
    to every row (the transformer's proj_in bias, so that its add is no pass of its own); weight, bias: (C,).
    On CUDA with Triton the kernel runs; elsewhere `reference`."""
    c = x.shape[-1]
    if not (triton_ready(x) and weight is not None and bias is not None and c <= MAX_C
            and (residual is None or residual.shape in (x.shape, (c,)))):
        return reference(x, weight, bias, eps, residual)
    x = x.contiguous()  # a no-op on the fast path, where tokens are channels-last maps
    rows = x.numel() // c
    c_p = triton.next_power_of_2(c)
    block_rows = max(1, TILE // c_p)
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    residual = residual.contiguous() if residual is not None else x  # x: a dummy pointer when there is none
    layer_norm_kernel[(triton.cdiv(rows, block_rows),)](
        x, residual, h, weight, bias, y, rows, c, eps,
        C_P=c_p, BLOCK_ROWS=block_rows, HAS_RES=h is not x, RES_ROWS=residual.shape == x.shape, num_warps=4 if block_rows * c_p <= 4096 else 8)
    return h, y
