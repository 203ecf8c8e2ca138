"""The GEGLU gate, a * gelu(b) for [a, b] = the halves of the up-projection: in one pass after the
projection (`geglu`), or in the projection's GEMM itself (`geglu_linear`).

Replaces: the `chunk` -> `F.gelu` -> `*` of `pare/models/transformer.py GEGLU.forward` (`geglu`), and
that and the `proj` linear layer before it (`geglu_linear`).
Source: Shazeer, "GLU Variants Improve Transformer" (arXiv 2002.05202, eq. 6), with the exact (erf)
GELU of Hendrycks & Gimpel (arXiv 1606.08415): gelu(b) = b * (1 + erf(b / sqrt(2))) / 2.

Why a kernel: PyTorch writes gelu(b) out and reads it back for the product: 5 passes over a
(tokens, inner) tensor where 3 do (read a and b, write the product); the gate is the widest
activation of SD's UNet (4x the channels). Arithmetic in float32, one rounding to the output dtype.

`geglu_linear` goes further: a Triton GEMM whose programs each make a tile of the value half and the
same tile of the gate half (two float32 accumulators over the same rows of x, loaded by TMA), and
apply the gate before anything is written. The (tokens, 2D) projection is never stored or read
back: on SD1.5's 64x64 level, per block, 42 MB written and read again, and 21 MB of gate output
written, become the 21 MB of output alone. Each half is rounded to the output dtype before the gate,
as the reference's linear layer stores it; the GEMM's float32 sums run in another order than
cuBLAS's, which is why it is held to the error budget, not to the bit. It takes float16 and bfloat16 only: a float32 GEMM in
Triton would run in TF32 or slowly, so float32 keeps PyTorch's GEMM and `geglu`.

Measured on H200s (benchmarks/NOTES.md, change 24; benchmarks/gemm_geglu.py): at 2048 tokens and
more, 0.83-1.00x the two steps' time with its operands in L2 and 0.88-1.02x with them cold; slower
below 2048 tokens, where the two steps stay (GEMM_MIN_ROWS). In the UNet: SD1.5 1.008x faster,
SDXL unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import INTERPRET, TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from triton.tools.tensor_descriptor import TensorDescriptor

    from ._geglu_triton import geglu_kernel, geglu_linear_kernel

BLOCK_ROWS, BLOCK_COLS = 8, 256
FUSED_GEMM = 1  # 0: `geglu_linear` runs PyTorch's GEMM, then `geglu` (read at call time: ab_fast.py --set)
# The fused GEMM's tile: rows of x, columns of each half, the K step; warps, pipeline stages, row tiles a group.
# Chosen among 15 with TMA loads on H200s (benchmarks/gemm_geglu.py; benchmarks/NOTES.md, change 24).
GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_BLOCK_K, GEMM_WARPS, GEMM_STAGES, GEMM_GROUP_M = 128, 64, 64, 8, 3, 4
GEMM_MIN_ROWS = 2048  # fewer tokens than this: cuBLAS's GEMM and the gate kernel measured faster (SD1.5's 16x16, 8x8)


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


def tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a Hopper (or later) GPU, 16-byte-aligned rows and bases (or the interpreter). Without
    them the two steps run: a pointer-loaded version of the kernel was slower than they are on an H200 at every
    shape of SD1.5's and SDXL's UNets (benchmarks/NOTES.md, change 24), so it is not kept."""
    if not INTERPRET and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """geglu(F.linear(x, weight, bias)): (..., K) -> (..., D), weight (2D, K). On a Hopper GPU with Triton, in
    float16 or bfloat16, for GEMM_MIN_ROWS rows or more, one kernel; elsewhere the two steps."""
    two_d, k = weight.shape
    m = x.numel() // k if x.shape[-1] == k else 0
    fused = (FUSED_GEMM and m >= GEMM_MIN_ROWS and triton_ready(x) and x.dtype in (torch.float16, torch.bfloat16)
             and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and two_d % 2 == 0)
    if not fused:
        return geglu(F.linear(x, weight, bias))
    x2 = x.reshape(-1, k).contiguous()  # (M, K); a view on the fast path, whose tokens are contiguous
    weight = weight.contiguous()
    if not tma_ready(x2, weight):
        return geglu(F.linear(x, weight, bias))
    d = two_d // 2
    y = torch.empty(*x.shape[:-1], d, device=x.device, dtype=x.dtype)
    bm, bn, bk = GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_BLOCK_K
    grid = (triton.cdiv(m, bm) * triton.cdiv(d, bn),)
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk])  # (BLOCK_M, BLOCK_K) boxes of x
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])  # (BLOCK_N, BLOCK_K) boxes of either half of w
    b_ptr = bias if bias is not None else weight  # a dummy pointer when there is no bias
    geglu_linear_kernel[grid](x_desc, w_desc, b_ptr, y, m, d, k, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk, GROUP_M=GEMM_GROUP_M, STAGES=GEMM_STAGES, num_warps=GEMM_WARPS)
    return y
