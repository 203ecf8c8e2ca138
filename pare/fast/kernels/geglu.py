"""The GEGLU gate, a * gelu(b) for [a, b] = the halves of the up-projection, in one pass.

Replaces: the `chunk` -> `F.gelu` -> `*` of `pare/models/transformer.py GEGLU.forward`.
Source: Shazeer, "GLU Variants Improve Transformer" (arXiv 2002.05202, eq. 6), with the exact (erf)
GELU of Hendrycks & Gimpel (arXiv 1606.08415): gelu(b) = b * (1 + erf(b / sqrt(2))) / 2.

Why a kernel: PyTorch writes gelu(b) out and reads it back for the product: 5 passes over a
(tokens, inner) tensor where 3 do (read a and b, write the product); the gate is the widest
activation of SD's UNet (4x the channels). Arithmetic in float32, one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._geglu_triton import geglu_kernel

BLOCK_ROWS, BLOCK_COLS = 8, 256


def reference(x: torch.Tensor) -> torch.Tensor:
    a, gate = x.chunk(2, dim=-1)  # (..., 2D) -> 2 x (..., D)
    return a * F.gelu(gate)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """(..., 2D) -> (..., D): the first half times gelu(the second half)."""
    if not (triton_ready(x) and x.is_contiguous()):
        return reference(x)
    d = x.shape[-1] // 2
    rows = x.numel() // (2 * d)
    y = torch.empty(*x.shape[:-1], d, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(d, BLOCK_COLS))
    geglu_kernel[grid](x, y, rows, d, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=4)
    return y
