"""The Triton side of `group_norm.py` (imported only where Triton is installed). Maps are channels last:
the value of pixel p, channel c of image b sits at b*HW*C + p*C + c, so a tile of (pixels, channels)
is read with unit stride along the channels."""

import triton
import triton.language as tl


@triton.jit
def stats(x_ptr, add_ptr, part_ptr, HW, C, rows_per_prog, n_progs,
          C_P: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_ADD: tl.constexpr):
    """Pass 1: per channel, (mean, M2) over this program's rows_per_prog pixels, merged block by block (Chan)."""
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_P)
    cm = c < C
    start = p * rows_per_prog
    end = tl.minimum(start + rows_per_prog, HW)
    a = tl.zeros((C_P,), dtype=tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + b * C + c, mask=cm, other=0.0).to(tl.float32)
    mean = tl.zeros((C_P,), dtype=tl.float32)
    m2 = tl.zeros((C_P,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_HW):
        rows = r0 + tl.arange(0, BLOCK_HW)  # (R,)
        mask = (rows[:, None] < end) & cm[None, :]  # (R, C_P)
        x = tl.load(x_ptr + b * HW * C + rows[:, None].to(tl.int64) * C + c[None, :], mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) + a[None, :], 0.0)
        n = tl.minimum(end - r0, BLOCK_HW).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n  # (C_P,)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        count = (r0 - start).to(tl.float32)  # values merged so far: every earlier block was full
        total = count + n
        delta = mean_b - mean
        mean += delta * (n / total)
        m2 += m2_b + delta * delta * (count * n / total)
    out = part_ptr + ((b * n_progs + p) * C + c) * 2
    tl.store(out, mean, mask=cm)
    tl.store(out + 1, m2, mask=cm)


@triton.jit
def finalize(part_ptr, stat_ptr, HW, C, CPG, rows_per_prog, n_progs, eps,
             G: tl.constexpr, BLOCK_P: tl.constexpr, CPG_P: tl.constexpr):
    """Pass 2: merge the (program, channel) entries of one (image, group) exactly -> mean, 1/sqrt(var + eps)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    j = tl.arange(0, CPG_P)
    ch = g * CPG + j  # (CPG_P,)
    total = (HW * CPG).to(tl.float32)
    acc = tl.zeros((BLOCK_P, CPG_P), dtype=tl.float32)
    for p0 in range(0, n_progs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p[:, None] < n_progs) & (j[None, :] < CPG)
        n_p = tl.maximum(tl.minimum(HW - p * rows_per_prog, rows_per_prog), 0).to(tl.float32)  # (BLOCK_P,)
        mean_pc = tl.load(part_ptr + ((b * n_progs + p[:, None]) * C + ch[None, :]) * 2, mask=m, other=0.0)
        acc += tl.where(m, n_p[:, None] * mean_pc, 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros((BLOCK_P, CPG_P), dtype=tl.float32)
    for p0 in range(0, n_progs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p[:, None] < n_progs) & (j[None, :] < CPG)
        n_p = tl.maximum(tl.minimum(HW - p * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        at = part_ptr + ((b * n_progs + p[:, None]) * C + ch[None, :]) * 2
        mean_pc = tl.load(at, mask=m, other=0.0)
        m2_pc = tl.load(at + 1, mask=m, other=0.0)
        acc += tl.where(m, m2_pc + n_p[:, None] * (mean_pc - mean) * (mean_pc - mean), 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    tl.store(stat_ptr + (b * G + g) * 2, mean)
    tl.store(stat_ptr + (b * G + g) * 2 + 1, tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps)))


@triton.jit
def apply(x_ptr, add_ptr, stat_ptr, w_ptr, bias_ptr, y_ptr, HW, C, CPG,
          G: tl.constexpr, C_P: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr):
    """Pass 3: y = (x + add) * (rstd * w) + (bias - mean * rstd * w), then y * sigmoid(y), over (pixels, channels)."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)  # (R,)
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (rows[:, None] < HW) & cm[None, :]  # (R, C_P)
    offs = b * HW * C + rows[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + b * C + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    grp = c // CPG
    mean = tl.load(stat_ptr + (b * G + grp) * 2, mask=cm, other=0.0)
    rstd = tl.load(stat_ptr + (b * G + grp) * 2 + 1, mask=cm, other=0.0)
    scale = rstd * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    shift = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32) - mean * scale
    y = x * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_bias_residual(x_ptr, r_ptr, bias_ptr, rows, C, C_P: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """x <- x + r + bias[c], in place, over (rows, channels): a conv's bias and the residual add in one pass."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (r[:, None] < rows) & cm[None, :]
    offs = r[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x + res + bias[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
