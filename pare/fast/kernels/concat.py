"""The channel concatenation of an up block's map and its skip connection, on channels-last maps.

Replaces: `torch.cat([hidden_states, skip], dim=1)` in `pare/models/unet_2d_blocks.py UpBlock2D` and
`CrossAttnUpBlock2D` (see `pare/fast/unet_blocks.py`).

Why a kernel: on channels-last maps the concatenation along channels interleaves the two maps pixel by pixel,
and PyTorch's cat kernel (CatArrayBatchedCopy) moved those bytes at about a third of the GPU's bandwidth on SD1.5's
up blocks (0.097 ms for its 12 cats a step, where a copy at full bandwidth takes about 0.035: benchmarks/NOTES.md).
Here each program copies a (pixels, BLOCK_C channels) tile from one of the two maps, coalesced along the channels.
A copy: the result is torch.cat's to the bit.
"""

from __future__ import annotations

import torch

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._concat_triton import concat as concat_kernel

TILE = 4096  # values per program, as the other elementwise passes
BLOCK_C = 64  # channels per tile: SD's channel counts (320, 640, 1280) are multiples of it
TRITON_CAT = 1  # 0: torch.cat everywhere (the A/B's switch)


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([a, b], dim=1) of (B, C_a, H, W) and (B, C_b, H, W) maps; channels last out on the kernel's path
    (CUDA with Triton, channels-last inputs of one dtype and device, C_a a multiple of BLOCK_C); torch.cat elsewhere
    (which also raises torch.cat's errors)."""
    channels_last = all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b))
    same = a.ndim == b.ndim == 4 and a.dtype == b.dtype and a.device == b.device and a.shape[0] == b.shape[0]
    if not (TRITON_CAT and triton_ready(a) and channels_last and same and a.shape[2:] == b.shape[2:]
            and a.shape[1] % BLOCK_C == 0):
        return torch.cat([a, b], dim=1)
    n, ca, h, w = a.shape
    cb = b.shape[1]
    y = torch.empty((n, ca + cb, h, w), dtype=a.dtype, device=a.device, memory_format=torch.channels_last)
    rows = n * h * w
    block_rows = TILE // BLOCK_C
    concat_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(ca + cb, BLOCK_C))](
        a, b, y, rows, ca, cb, BLOCK_ROWS=block_rows, BLOCK_C=BLOCK_C, num_warps=4)
    return y
