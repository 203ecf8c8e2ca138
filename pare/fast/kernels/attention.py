"""Scaled dot-product attention over few keys (the text's 77, or a small map's tokens), read from and written to
the (B, N, heads * d) layout that the projections use.

Replaces: the `F.scaled_dot_product_attention` call of `pare/fast/attention.py FastAttention.attend` (and of
`pare/models/attention.py Attention.forward`) where there are at most MAX_KEYS keys and no mask:
softmax(Q K^T / sqrt(d)) V per head (Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, eq. 1), by
FlashAttention-2's online softmax (Dao, arXiv 2307.08691).

Why a kernel: PyTorch runs cuDNN's flash kernel for every UNet shape here (benchmarks/NOTES.md, change 14). Over
77 keys that kernel is not bound by its arithmetic but by its fixed costs, and this plain Triton kernel with small
tiles takes 0.64-0.82x its time at every cross-attention shape of SD1.5 and SDXL, and 0.89x on SD1.5's 256-token
self-attention (H200, batch 2; change 39, benchmarks/attention.py). Over thousands of keys cuDNN's is 1.08-1.33x
faster than this one at its best tile, so those stay with SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._attention_triton import attention_kernel

# Queries a program, keys a step, warps, pipeline stages: of the 14 tiles tried, the best at the shapes it runs
# (benchmarks/attention.py; NOTES.md, change 39).
BLOCK_M, BLOCK_N, WARPS, STAGES = 64, 32, 4, 3
MAX_KEYS = 256  # more keys than this: SDPA (read at call time: ab_fast.py --set attention.MAX_KEYS=0)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, heads * d), k and v (B, M, heads * d) -> (B, N, heads * d), by PyTorch's SDPA."""
    b, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (x.unflatten(-1, (heads, d)).transpose(1, 2) for x in (q, k, v))  # (B, heads, N or M, d), views
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, max_keys: int | None = None,
              block_m: int | None = None, block_n: int | None = None, warps: int | None = None,
              stages: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head: q (B, N, heads * d), k and v (B, M, heads * d) -> (B, N, heads * d).
    The kernel where Triton runs, in float16 or bfloat16, with at most MAX_KEYS keys, d <= 256 and unit strides
    along the channels (views of a fused projection are fine); SDPA elsewhere. The keyword arguments override the
    module's constants (for benchmarks/attention.py)."""
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    if not (triton_ready(q) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and m <= (MAX_KEYS if max_keys is None else max_keys) and d <= 256
            and all(x.stride(-1) == 1 for x in (q, k, v))):
        return reference(q, k, v, heads)
    o = torch.empty(b, n, inner, device=q.device, dtype=q.dtype)
    block_m = block_m or BLOCK_M
    grid = (triton.cdiv(n, block_m), b * heads)
    attention_kernel[grid](q, k, v, o, n, m, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), o.stride(0), o.stride(1), d**-0.5, D=d,
                           D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n or BLOCK_N,
                           STAGES=stages or STAGES, num_warps=warps or WARPS)
    return o
