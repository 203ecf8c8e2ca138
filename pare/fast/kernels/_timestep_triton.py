"""The Triton side of `timestep.py` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def sinusoids(t_ptr, t_stride, f_ptr, y_ptr, scale, HALF, DIM, BLOCK: tl.constexpr, FLIP: tl.constexpr):
    """Row n of y (N, DIM), float32: [sin(scale t_n w), cos(scale t_n w)] over the HALF frequencies w (or [cos, sin]
    with FLIP), then zeros up to DIM; the products rounded in the reference's order, sin and cos at full precision
    (Triton lowers them to libdevice's sinf and cosf, as CUDA's own). t_n sits at t_ptr + n * t_stride: a
    timestep broadcast over the batch (stride 0, as the UNet expands it) is read where it is."""
    n = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    w = tl.load(f_ptr + i, mask=m, other=0.0)  # (BLOCK,)
    t = tl.load(t_ptr + n * t_stride).to(tl.float32)
    angle = (scale * t) * w
    s, c = tl.sin(angle), tl.cos(angle)
    row = y_ptr + n * DIM
    tl.store(row + i, c if FLIP else s, mask=m)
    tl.store(row + HALF + i, s if FLIP else c, mask=m)
    tl.store(row + 2 * HALF + i, tl.zeros_like(angle), mask=i < DIM - 2 * HALF)  # an odd DIM's zero feature
