"""The Triton side of `pixel_shuffle.py` (imported only where Triton is installed). Maps are channels last:
the value of pixel (y, x), channel c of image b sits at ((b*H + y)*W + x)*C + c, so a tile of (output pixels,
channels) reads and writes with unit stride along the channels."""

import triton
import triton.language as tl


@triton.jit
def interleave(p_ptr, bias_ptr, y_ptr, H, W, C, rows,
               C_P: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[b, 2i + a, 2j + e, :] = p[b, i + a, j + e, k*C:(k+1)*C] + bias, k = 2a + e: p (B, H+1, W+1, 4C) holds the four
    phases of the output as channel blocks, y is (B, 2H, 2W, C); the rows of the tile are y's pixels, flattened."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,): output pixels of all images
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (r[:, None] < rows) & cm[None, :]  # (R, C_P)
    r64 = r.to(tl.int64)
    x_out = r64 % (2 * W)
    y_out = (r64 // (2 * W)) % (2 * H)
    b = r64 // (4 * H * W)
    a, e = y_out % 2, x_out % 2  # the output pixel's phase: row and column parity
    src = (b * (H + 1) + y_out // 2 + a) * (W + 1) + x_out // 2 + e  # (R,): its pixel of p
    v = tl.load(p_ptr + (src * 4 * C + (2 * a + e) * C)[:, None] + c[None, :], mask=mask, other=0.0)
    if HAS_BIAS:  # the conv's bias, added to the rounded conv output as PyTorch adds it after cuDNN's conv
        v = v.to(tl.float32) + tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64[:, None] * C + c[None, :], v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def phase_weights(w_ptr, out_ptr, O, I, BLOCK: tl.constexpr):
    """The four phases' 2x2 kernels of a 3x3 kernel (see `pare/fast/resampling.py`). w: (O, I, 3, 3) channels last,
    so w[o, i, p, q] sits at (o*9 + 3p + q)*I + i; out: (4 O, I, 2, 2) channels last, phase k = 2a + e first. Tap y of
    phase a sums the rows p from y(1 + a) to 2y + a(1 - y): (0), (1, 2) for a = 0; (0, 1), (2) for a = 1; likewise
    the columns. Sums in float32, rounded once."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,): flattened (o, i)
    m = n < O * I
    o, i = (n // I).to(tl.int64), n % I
    for a in tl.static_range(2):
        for e in tl.static_range(2):
            for y in tl.static_range(2):
                for x in tl.static_range(2):
                    acc = tl.zeros((BLOCK,), dtype=tl.float32)
                    for p in tl.static_range(y * (1 + a), 2 * y + a * (1 - y) + 1):
                        for q in tl.static_range(x * (1 + e), 2 * x + e * (1 - x) + 1):
                            acc += tl.load(w_ptr + (o * 9 + 3 * p + q) * I + i, mask=m, other=0.0).to(tl.float32)
                    dst = (((2 * a + e) * O + o) * 4 + 2 * y + x) * I + i
                    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=m)
