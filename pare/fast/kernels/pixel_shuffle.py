"""The sub-pixel convolution's two passes: its phase kernels from a 3x3 kernel, and the interleave of its four
phase maps into the 2x map, adding the conv's bias.

Used by: `pare/fast/resampling.py FastUpsample2D`, whose one convolution computes the four phases of the
upsampled output (output pixels of each row and column parity) as four channel blocks of a map one pixel
larger than its input, p (B, 4C, H+1, W+1):
    y[b, :, 2i + a, 2j + e] = p[b, k*C:(k+1)*C, i + a, j + e] + bias,   k = 2a + e,
Shi et al.'s periodic shuffling (arXiv 1609.05158, eq. 4), with each phase read at its own offset: see
resampling.py for why the phases sit one pixel apart.

Why a kernel: the reference adds the conv's bias in a pass of its own over the (strided, channels-last) output;
here it rides on the copy that interleaving needs anyway. One read of p, one write of y, coalesced over
channels, the sum rounded once to y's dtype as PyTorch rounds `conv(x) + bias` after cuDNN's conv.
"""

from __future__ import annotations

import torch

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._pixel_shuffle_triton import interleave as interleave_kernel
    from ._pixel_shuffle_triton import phase_weights as phase_weights_kernel

TILE = 4096  # values per program, as the other elementwise passes


def phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap axis `dim` of a kernel -> the two 2-tap kernels of the output's even and odd phases along it."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_weight_reference(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the kernels of phases (a, e) = (0, 0), (0, 1), (1, 0), (1, 1),
    in that order (k = 2a + e), the taps summed in float32 (or wider) and rounded once. Channels last out."""
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
    phases = [p for rows in phase_taps(wide, 2) for p in phase_taps(rows, 3)]  # 4 x (C_out, C_in, 2, 2)
    return torch.cat(phases).to(weight.dtype).contiguous(memory_format=torch.channels_last)  # (4 C_out, C_in, 2, 2)


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """`phase_weight_reference` in one pass: on CUDA with Triton the kernel runs (reading the 9 taps, writing the
    16), so the phase kernels can be made at each call instead of held beside the conv's weight."""
    if not (triton_ready(weight) and weight.shape[2:] == (3, 3)):
        return phase_weight_reference(weight)
    o, i = weight.shape[:2]
    weight = weight.contiguous(memory_format=torch.channels_last)  # a no-op on the fast path
    out = torch.empty((4 * o, i, 2, 2), dtype=weight.dtype, device=weight.device, memory_format=torch.channels_last)
    phase_weights_kernel[(triton.cdiv(o * i, TILE),)](weight, out, o, i, BLOCK=TILE, num_warps=8)
    return out


def reference(p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same function in plain PyTorch: the CPU path, and what the kernel is tested against."""
    b, c4, h1, w1 = p.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    y = torch.empty((b, c, 2 * h, 2 * w), dtype=p.dtype, device=p.device, memory_format=torch.channels_last)
    for a in (0, 1):
        for e in (0, 1):
            k = 2 * a + e
            phase = p[:, k * c:(k + 1) * c, a:a + h, e:e + w]  # (B, C, H, W)
            y[:, :, a::2, e::2] = phase if bias is None else phase + bias[:, None, None]
    return y


def interleave_phases(p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, 4C, H+1, W+1) phases -> (B, C, 2H, 2W), plus bias (C,) or None. Channels last out. On CUDA with Triton the
    kernel runs; elsewhere `reference`."""
    b, c4, h1, w1 = p.shape
    if c4 % 4:
        raise ValueError(f"interleave_phases: the phases come as 4 channel blocks, got {c4} channels")
    if not triton_ready(p):
        return reference(p, bias)
    p = p.contiguous(memory_format=torch.channels_last)  # a no-op on the fast path: cuDNN writes channels last
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    y = torch.empty((b, c, 2 * h, 2 * w), dtype=p.dtype, device=p.device, memory_format=torch.channels_last)
    rows = b * 4 * h * w
    c_p = triton.next_power_of_2(c)
    block_rows = max(1, TILE // c_p)
    interleave_kernel[(triton.cdiv(rows, block_rows),)](
        p, bias if bias is not None else p, y, h, w, c, rows, C_P=c_p, BLOCK_ROWS=block_rows,
        HAS_BIAS=bias is not None, num_warps=4 if block_rows * c_p <= 4096 else 8)
    return y
