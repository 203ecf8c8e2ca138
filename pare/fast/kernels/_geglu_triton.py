"""The Triton side of `geglu.py`: x is (rows, 2D) row-major, y is (rows, D)."""

import triton
import triton.language as tl


@triton.jit
def geglu_kernel(x_ptr, y_ptr, rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    base = r[:, None].to(tl.int64) * (2 * D) + c[None, :]
    a = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + base + D, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    tl.store(y_ptr + r[:, None].to(tl.int64) * D + c[None, :], (a * gelu).to(y_ptr.dtype.element_ty), mask=mask)
