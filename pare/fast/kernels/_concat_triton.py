"""The Triton side of `concat.py` (imported only where Triton is installed). Maps are channels last: pixel r of
a (B, C, H, W) map holds its C channels at r*C .. r*C + C - 1, so the channel concatenation of two maps is, pixel
by pixel, a's C_a values and then b's C_b."""

import triton
import triton.language as tl


@triton.jit
def concat(a_ptr, b_ptr, y_ptr, rows, CA, CB, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[r, :CA] = a[r], y[r, CA:] = b[r], over (pixels, BLOCK_C channels) tiles. CA is a multiple of BLOCK_C, so
    each tile copies from one of the two maps: a branch per program, not per value."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
    c0 = tl.program_id(1) * BLOCK_C
    rows_ok = r[:, None] < rows
    r64 = r.to(tl.int64)[:, None]
    if c0 < CA:
        c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(a_ptr + r64 * CA + c[None, :], mask=rows_ok)
    else:
        c = c0 - CA + tl.arange(0, BLOCK_C)
        v = tl.load(b_ptr + r64 * CB + c[None, :], mask=rows_ok & (c[None, :] < CB))
        c = c + CA
    tl.store(y_ptr + r64 * (CA + CB) + c[None, :], v, mask=rows_ok & (c[None, :] < CA + CB))
