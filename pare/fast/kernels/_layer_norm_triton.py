"""The Triton side of `layer_norm.py` (imported only where Triton is installed). Tokens are rows:
the value of token t, channel c sits at t*C + c, so a (rows, channels) tile is read with unit
stride along the channels, and a row's statistics are a reduction over the tile's second axis."""

import triton
import triton.language as tl


@triton.jit
def layer_norm(x_ptr, res_ptr, h_ptr, w_ptr, b_ptr, y_ptr, rows, C, eps,
               C_P: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_RES: tl.constexpr, RES_ROWS: tl.constexpr):
    """y = (h - mean) / sqrt(var + eps) * w + b over each row, h = x, or with HAS_RES h = x + res (also written):
    res has the rows of x (RES_ROWS), or is one (C,) row added to every row (a projection's bias)."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (r[:, None] < rows) & cm[None, :]  # (R, C_P)
    offs = r[:, None].to(tl.int64) * C + c[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:  # the residual add, rounded to the stream's dtype as the reference rounds it
        if RES_ROWS:
            res = tl.load(res_ptr + offs, mask=mask, other=0.0)
        else:
            res = tl.load(res_ptr + c, mask=cm, other=0.0)[None, :]
        h = (h.to(tl.float32) + res.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
    h = h.to(tl.float32)
    mean = tl.sum(h, axis=1) / C  # (R,)
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(d * d, axis=1) / C + eps))  # (R,)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
