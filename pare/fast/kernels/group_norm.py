"""GroupNorm, with an optional per-channel add before it and SiLU after it, on channels-last maps.

Replaces: `nn.GroupNorm` + `nn.SiLU` in `pare/models/resnet.py ResnetBlock2D` (norm1 -> act, and
(h + temb) -> norm2 -> act), and plain `nn.GroupNorm` everywhere else on the fast path (the
transformers' norm, the VAE attention's norm, conv_norm_out).
Source: Wu & He, Group Normalization (arXiv 1803.08494, eq. 1 and 3); the statistics of a tile's
channels, then of the tiles, are merged by the pairwise update of Chan, Golub & LeVeque (1979): for
parts of n_i values with mean m_i and sum of squared deviations M2_i,
    mean = sum_i n_i m_i / N,    M2 = sum_i M2_i + n_i (m_i - mean)^2,    var = M2 / N.

Why a kernel: PyTorch's CUDA GroupNorm reads NCHW, so on a channels-last map it pays a layout
copy in and out, and the SiLU (and the time-embedding add) are more passes over the map. Here
x is read twice and y written once, coalesced over channels, whatever the layout of the convs
around it wants (channels last: cuDNN's fastest convs on Hopper).

Three launches:
    1. stats:    one program per BLOCK_HW pixels of one image, a (pixels, channels) tile: each channel's
                 (mean, M2) over the tile's pixels, gathered into (groups, channels of a group) and
                 merged by the same update, with no loop -> (mean, M2) of each group there.
    2. finalize: one program per (image, group): merge the tiles -> (mean, 1/sqrt(var + eps)).
    3. apply:    y = (x + add - mean) * rstd * weight + bias, then SiLU, in one pass.
`add` is the time embedding's projection (B, C) and a conv's bias (C,), read as they are, in any dtype,
and summed in float32 in the kernel: no pass (or launch) of their own to widen and sum them.
All arithmetic is float32; the input and output keep their dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._group_norm_triton import add_bias_residual as add_bias_residual_kernel
    from ._group_norm_triton import apply, finalize, stats

TILE = 4096  # values per program in the apply and bias-residual passes: a few per thread at 4 warps
STATS_TILE = 32768  # values per program in the stats pass: larger tiles measured faster (benchmarks/NOTES.md)
STATS_WARPS = 4  # 4 measured faster than 8 or 16 (benchmarks/NOTES.md)


def reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
              add: torch.Tensor | None = None, silu: bool = False, channel_add: torch.Tensor | None = None) -> torch.Tensor:
    """The same function in plain PyTorch: the CPU path, and what the kernel is tested against."""
    dtype = x.dtype
    if add is not None or channel_add is not None:
        wide = torch.promote_types(dtype, torch.float32)  # the adds in float32 (or wider), as the kernel does them
        a = sum(t.to(wide) for t in (add, channel_add) if t is not None)  # (B, C) or (C,)
        x = (x + a.expand(x.shape[0], -1)[:, :, None, None]).to(dtype)  # (B, C, 1, 1)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               add: torch.Tensor | None = None, silu: bool = False, channel_add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x + add + channel_add) [then SiLU]. x: (B, C, H, W); add: (B, C) or None (its rows may be strided:
    a slice of the stacked time projections); channel_add: (C,) or None (a conv's bias, added to every image).
    Both are added in float32. On CUDA with Triton the kernel runs, and the result is channels last; elsewhere
    `reference`."""
    b, c, h, w = x.shape
    if not (triton_ready(x) and weight is not None and bias is not None and c % num_groups == 0):
        return reference(x, num_groups, weight, bias, eps, add, silu, channel_add)
    x = x.contiguous(memory_format=torch.channels_last)  # a no-op on the fast path, where maps are channels last
    hw, cpg = h * w, c // num_groups
    g_p, cpg_p, c_p = triton.next_power_of_2(num_groups), triton.next_power_of_2(cpg), triton.next_power_of_2(c)
    rows_stats = max(1, STATS_TILE // c_p)
    rows_apply = max(1, TILE // c_p)
    n_tiles = triton.cdiv(hw, rows_stats)
    if add is not None and add.stride(1) != 1:
        add = add.contiguous()
    add_ = add if add is not None else x  # a dummy pointer when there is no add
    cadd = channel_add.contiguous() if channel_add is not None else x
    add_stride = add.stride(0) if add is not None else 0
    partial = torch.empty(b, n_tiles, g_p, 2, device=x.device, dtype=torch.float32)  # (mean, M2) per tile and group
    stat = torch.empty(b, num_groups, 2, device=x.device, dtype=torch.float32)  # (mean, rstd) per group
    y = torch.empty_like(x, memory_format=torch.channels_last)
    warps = lambda values: 4 if values <= 4096 else 8  # noqa: E731
    stats[(n_tiles, b)](x, add_, cadd, partial, hw, c, cpg, n_tiles, add_stride, G=num_groups, G_P=g_p, C_P=c_p,
                        CPG_P=cpg_p, BLOCK_HW=rows_stats, HAS_ADD=add is not None, HAS_CADD=channel_add is not None,
                        num_warps=STATS_WARPS if rows_stats * c_p > 4096 else 4)
    finalize[(b, num_groups)](partial, stat, hw, cpg, n_tiles, eps, G=num_groups, G_P=g_p, BLOCK_HW=rows_stats,
                              BLOCK_T=min(1024, triton.next_power_of_2(n_tiles)), num_warps=4)
    apply[(triton.cdiv(hw, rows_apply), b)](x, add_, cadd, stat, weight, bias, y, hw, c, cpg, add_stride,
                                            G=num_groups, C_P=c_p, BLOCK_HW=rows_apply, HAS_ADD=add is not None,
                                            HAS_CADD=channel_add is not None, SILU=silu,
                                            num_warps=warps(rows_apply * c_p))
    return y


def add_bias_residual(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None,
                      bias2: torch.Tensor | None = None) -> torch.Tensor:
    """x + residual + bias[c] (+ bias2[c]) on (B, C, H, W) maps, in one pass, written into x (a conv's output,
    unbiased). bias2: a second conv's bias (the shortcut's), added in float32 with the first."""
    if bias is None:
        bias, bias2 = bias2, None
    if not (triton_ready(x) and bias is not None and x.is_contiguous(memory_format=torch.channels_last)):
        out = x + residual
        if bias is None:
            return out
        wide = torch.promote_types(x.dtype, torch.float32)
        both = bias.to(wide) if bias2 is None else bias.to(wide) + bias2.to(wide)
        return (out + both[:, None, None]).to(x.dtype)
    residual = residual.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    c_p = triton.next_power_of_2(c)
    rows = max(1, TILE // c_p)
    grid = (triton.cdiv(b * h * w, rows),)
    add_bias_residual_kernel[grid](x, residual, bias, bias if bias2 is None else bias2, b * h * w, c, C_P=c_p,
                                   BLOCK_ROWS=rows, HAS_BIAS2=bias2 is not None, num_warps=4 if rows * c_p <= 4096 else 8)
    return x
