"""Scaled dot-product attention of the UNet's tokens, read from and written to the (B, N, heads * d) layout that
the projections use.

Replaces: the `F.scaled_dot_product_attention` call of `pare/fast/attention.py FastAttention.attend` (and of
`pare/models/attention.py Attention.forward`): softmax(Q K^T / sqrt(d)) V per head (Vaswani et al., "Attention Is
All You Need", arXiv 1706.03762, eq. 1), without a mask.

Why a kernel: PyTorch runs cuDNN's flash kernel for every UNet shape here (benchmarks/NOTES.md, change 14); on
SD1.5's 64x64 level (4096 tokens, 8 heads of 40) it takes 0.7 ms of the 5.5 ms step. That kernel is bound by the
exponentials: 2 x 8 x 4096^2 of them, on a unit that makes 16 a cycle per SM, are 70 us a call, as long as the two
products' tensor-core work at d padded to 64. `POLY` moves half of them to the FMA units (`exp2_poly`), as
FlashAttention-4 does. The algorithm is FlashAttention-2's online softmax (Dao, arXiv 2307.08691).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._attention_triton import attention_kernel

BLOCK_M, BLOCK_N, WARPS, STAGES = 128, 64, 4, 2
POLY = 1  # half of the exponentials by the polynomial (read at call time: ab_fast.py --set)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, heads * d), k and v (B, M, heads * d) -> (B, N, heads * d), by PyTorch's SDPA."""
    b, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (x.unflatten(-1, (heads, d)).transpose(1, 2) for x in (q, k, v))  # (B, heads, N or M, d)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, block_m: int | None = None,
              block_n: int | None = None, warps: int | None = None, stages: int | None = None,
              poly: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head: q (B, N, heads * d), k and v (B, M, heads * d), each with unit stride
    along its last axis (views of a fused projection are fine) -> (B, N, heads * d), contiguous. The keyword
    arguments override the module's tile constants (for benchmarks/attention.py)."""
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    if not (triton_ready(q) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and all(x.stride(-1) == 1 for x in (q, k, v)) and d <= 256):
        return reference(q, k, v, heads)
    o = torch.empty(b, n, inner, device=q.device, dtype=q.dtype)
    block_m = block_m or BLOCK_M
    grid = (triton.cdiv(n, block_m), b * heads)
    attention_kernel[grid](q, k, v, o, n, m, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), o.stride(0), o.stride(1), d**-0.5, D=d,
                           D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n or BLOCK_N,
                           POLY=POLY if poly is None else poly, STAGES=stages or STAGES, num_warps=warps or WARPS)
    return o
