"""The Triton side of `group_norm.py` (imported only where Triton is installed). Maps are channels last:
the value of pixel p, channel c of image b sits at b*HW*C + p*C + c, so a tile of (pixels, channels)
is read with unit stride along the channels (stats and apply alike).

Tried and dropped (benchmarks/NOTES.md): statistics per channel over (pixels, channels) tiles merged
in a loop by Chan's update, with fewer programs: coalesced, but 1.5x slower than the (pixels,
groups, channels of a group) tiles that `stats` used then, on SD1.5's UNet, its in-loop reductions
serialising it. `stats` now merges once per program, with no loop: each tile's channels into groups.
It gathers the channels' statistics into (groups, channels of a group) to do so: a one-hot (channels,
groups) matrix, tried first, is C_P x G_P values a program, and spilled registers from C = 1280 on (ptxas).
Also dropped: `apply` merging the tiles' partials itself on small maps, to save `finalize`'s launch (change 42:
0.05 ms slower on SD1.5's UNet)."""

import triton
import triton.language as tl


@triton.jit
def load_tile(x_ptr, add_ptr, cadd_ptr, b, tile, HW, C, add_stride,
              C_P: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_ADD: tl.constexpr, HAS_CADD: tl.constexpr):
    """The (pixels, channels) tile of image b that `stats` and `apply` read, in float32, plus what is added to
    each channel before the norm: add[b, c] (image b's row, any dtype, rows add_stride apart: a slice of the
    stacked time projections) + cadd[c] (a conv's bias). Returns the tile, its offsets, its mask, the channels
    (C_P,) and their mask; masked values are undefined."""
    rows = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)  # (R,)
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (rows[:, None] < HW) & cm[None, :]  # (R, C_P)
    offs = b * HW * C + rows[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD or HAS_CADD:
        a = tl.zeros_like(c).to(tl.float32)  # (C_P,): summed first, then added to the tile once
        if HAS_ADD:
            a += tl.load(add_ptr + b * add_stride + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_CADD:
            a += tl.load(cadd_ptr + c, mask=cm, other=0.0).to(tl.float32)
        x += a[None, :]
    return x, offs, mask, c, cm


@triton.jit
def stats(x_ptr, add_ptr, cadd_ptr, part_ptr, HW, C, CPG, n_tiles, add_stride,
          G: tl.constexpr, G_P: tl.constexpr, C_P: tl.constexpr, CPG_P: tl.constexpr, BLOCK_HW: tl.constexpr,
          HAS_ADD: tl.constexpr, HAS_CADD: tl.constexpr):
    """Pass 1: (mean, M2) of every group over BLOCK_HW pixels. The tile is (pixels, channels), as in `apply`:
    each channel's (mean, M2) over the tile's pixels, gathered into (groups, channels of a group) and merged
    along the group's channels exactly (Chan et al.)."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    x, offs, mask, c, cm = load_tile(x_ptr, add_ptr, cadd_ptr, b, tile, HW, C, add_stride, C_P, BLOCK_HW,
                                     HAS_ADD, HAS_CADD)
    if HAS_ADD or HAS_CADD:
        x = tl.where(mask, x, 0.0)  # the sums below count only the tile's values
    n = tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW).to(tl.float32)  # pixels in this tile: values of one channel
    mean_c = tl.sum(x, axis=0) / n  # (C_P,)
    d = tl.where(mask, x - mean_c[None, :], 0.0)
    m2_c = tl.sum(d * d, axis=0)  # (C_P,)
    k = tl.arange(0, G_P * CPG_P)  # (G_P * CPG_P,): (group, channel of the group), flattened
    kg, kj = k // CPG_P, k % CPG_P
    valid = (kg < G) & (kj < CPG)
    ch = tl.where(valid, kg * CPG + kj, 0)  # its channel
    ok = tl.reshape(valid, (G_P, CPG_P))
    mean_gc = tl.reshape(tl.gather(mean_c, ch, 0), (G_P, CPG_P))
    m2_gc = tl.reshape(tl.gather(m2_c, ch, 0), (G_P, CPG_P))
    mean = tl.sum(tl.where(ok, mean_gc, 0.0), axis=1) / CPG  # (G_P,): CPG channels of n values each
    dm = mean_gc - mean[:, None]  # (G_P, CPG_P)
    m2 = tl.sum(tl.where(ok, m2_gc + n * dm * dm, 0.0), axis=1)  # (G_P,)
    g = tl.arange(0, G_P)
    out = part_ptr + ((b * n_tiles + tile) * G_P + g) * 2
    tl.store(out, mean, mask=g < G)
    tl.store(out + 1, m2, mask=g < G)


@triton.jit
def finalize(part_ptr, stat_ptr, HW, CPG, n_tiles, eps,
             G: tl.constexpr, G_P: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pass 2: merge the tiles of one (image, group) exactly (Chan et al.) -> mean and 1/sqrt(var + eps)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    total = (HW * CPG).to(tl.float32)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        m = t < n_tiles
        mean_t = tl.load(part_ptr + ((b * n_tiles + t) * G_P + g) * 2, mask=m, other=0.0)
        n_t = tl.where(m, tl.minimum(HW - t * BLOCK_HW, BLOCK_HW) * CPG, 0).to(tl.float32)
        acc += n_t * mean_t
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        m = t < n_tiles
        mean_t = tl.load(part_ptr + ((b * n_tiles + t) * G_P + g) * 2, mask=m, other=0.0)
        m2_t = tl.load(part_ptr + ((b * n_tiles + t) * G_P + g) * 2 + 1, mask=m, other=0.0)
        n_t = tl.where(m, tl.minimum(HW - t * BLOCK_HW, BLOCK_HW) * CPG, 0).to(tl.float32)
        acc += m2_t + n_t * (mean_t - mean) * (mean_t - mean)
    var = tl.sum(acc, axis=0) / total
    tl.store(stat_ptr + (b * G + g) * 2, mean)
    tl.store(stat_ptr + (b * G + g) * 2 + 1, tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps)))


@triton.jit
def apply(x_ptr, add_ptr, cadd_ptr, stat_ptr, w_ptr, bias_ptr, y_ptr, HW, C, CPG, add_stride,
          G: tl.constexpr, C_P: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_ADD: tl.constexpr, HAS_CADD: tl.constexpr,
          SILU: tl.constexpr):
    """Pass 3: y = (x + add) * (rstd * w) + (bias - mean * rstd * w), then y * sigmoid(y), over (pixels, channels)."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    x, offs, mask, c, cm = load_tile(x_ptr, add_ptr, cadd_ptr, b, tile, HW, C, add_stride, C_P, BLOCK_HW,
                                     HAS_ADD, HAS_CADD)
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
def add_bias_residual(x_ptr, r_ptr, bias_ptr, bias2_ptr, rows, C, C_P: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      HAS_BIAS2: tl.constexpr):
    """x <- x + r + bias[c] (+ bias2[c]), in place, over (rows, channels): the convs' biases and the residual add
    in one pass."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, C_P)
    cm = c < C
    mask = (r[:, None] < rows) & cm[None, :]
    offs = r[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_BIAS2:
        bias += tl.load(bias2_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x + res + bias[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
