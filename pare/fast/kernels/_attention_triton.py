"""The Triton side of `attention.py`: softmax(Q K^T / sqrt(d)) V, one (BLOCK_M queries, head) tile a program."""

import triton
import triton.language as tl


@triton.jit
def exp2_poly(x):
    """2^x for x <= 0 on the FMA units, not the special-function unit that `tl.math.exp2` uses (the idea of
    FlashAttention-4: that unit does 16 results a cycle per SM, the FMA units 128 operations). x = n + f with
    n = round(x), f in [-1/2, 1/2]; 2^f by a degree-4 polynomial (relative error 2.9e-6 in float32, 80x under
    float16's half ulp, 2.4e-4); 2^n added to the float's exponent bits. Rounding to an integer by adding
    1.5 * 2^23 keeps it off the conversion unit too. x is clamped at -125: below 2^-125 the result is 2^-125, which
    is 0 once p is rounded to float16 or bfloat16, and nothing beside the row sums of at least 1."""
    x = tl.maximum(x, -125.0)
    big = 12582912.0  # 1.5 * 2^23: adding it rounds to an integer, left in the low mantissa bits
    t = x + big
    n = t.to(tl.int32, bitcast=True) - 0x4B400000  # round(x), from the bits of t
    f = x - (t - big)  # (-1/2, 1/2]
    p = 9.582852823e-3  # c4 ... c1 of 1 + c1 f + ... + c4 f^4, fitted for the least worst-case relative error
    p = p * f + 5.590642785e-2
    p = p * f + 2.402409864e-1
    p = p * f + 6.931241930e-1
    p = p * f + 1.0
    return (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N, M, heads, sq_b, sq_n, sk_b, sk_n, sv_b, sv_n, so_b, so_n,
                     scale, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     POLY: tl.constexpr, STAGES: tl.constexpr):
    """o = softmax(q k^T * scale) v for one (batch, head) and BLOCK_M queries. q (B, N, heads * D), k and v
    (B, M, heads * D), o (B, N, heads * D): head h is columns [h D, (h+1) D) of each token's row, tokens at the
    given strides (so q, k, v may be views of one fused projection). D is padded to D_PAD with zeros in the loads.
    The online softmax of FlashAttention-2 (Dao, arXiv 2307.08691, Algorithm 1): scores in float32, in base 2
    (scale times log2 e), p rounded to the input dtype for the second product, as cuDNN's and PyTorch's kernels
    do; the row sums l in float32, divided out once at the end. POLY: half of each key tile's exponentials by
    `exp2_poly`, the other half by the special-function unit (so the two units share the work)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    d = tl.arange(0, D_PAD)
    dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + rows[:, None] * sq_n + h * D + d[None, :],
                mask=(rows < N)[:, None] & dm[None, :], other=0.0)  # (BLOCK_M, D_PAD)
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * D
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * D
    qk_scale = scale * 1.4426950408889634  # e^s = 2^(s log2 e)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    HALF: tl.constexpr = BLOCK_N // 2
    for start in tl.range(0, M, BLOCK_N, num_stages=STAGES):
        if POLY:
            c0 = start + tl.arange(0, HALF)
            c1 = c0 + HALF
            k0 = tl.load(k_base + c0[None, :] * sk_n + d[:, None], mask=dm[:, None] & (c0 < M)[None, :], other=0.0)
            k1 = tl.load(k_base + c1[None, :] * sk_n + d[:, None], mask=dm[:, None] & (c1 < M)[None, :], other=0.0)
            s0 = tl.where((c0 < M)[None, :], tl.dot(q, k0), float("-inf"))  # (BLOCK_M, HALF)
            s1 = tl.where((c1 < M)[None, :], tl.dot(q, k1), float("-inf"))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)) * qk_scale)
            p0 = tl.math.exp2(s0 * qk_scale - m_new[:, None])
            p1 = exp2_poly(s1 * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
            acc = acc * alpha[:, None]
            v0 = tl.load(v_base + c0[:, None] * sv_n + d[None, :], mask=(c0 < M)[:, None] & dm[None, :], other=0.0)
            v1 = tl.load(v_base + c1[:, None] * sv_n + d[None, :], mask=(c1 < M)[:, None] & dm[None, :], other=0.0)
            acc = tl.dot(p0.to(v0.dtype), v0, acc)
            acc = tl.dot(p1.to(v1.dtype), v1, acc)
        else:
            cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
            cm = cols < M
            k = tl.load(k_base + cols[None, :] * sk_n + d[:, None], mask=dm[:, None] & cm[None, :],
                        other=0.0)  # (D_PAD, BLOCK_N)
            s = tl.where(cm[None, :], tl.dot(q, k), float("-inf"))  # (BLOCK_M, BLOCK_N), float32
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # the running row maximum, in base 2
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * sv_n + d[None, :], mask=cm[:, None] & dm[None, :],
                        other=0.0)  # (BLOCK_N, D_PAD)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b.to(tl.int64) * so_b + rows[:, None] * so_n + h * D + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None] & dm[None, :])
