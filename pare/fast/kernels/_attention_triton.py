"""The Triton side of `attention.py`: softmax(Q K^T / sqrt(d)) V, one (BLOCK_M queries, head) tile a program."""

import triton
import triton.language as tl


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N, M, heads, sq_b, sq_n, sk_b, sk_n, sv_b, sv_n, so_b, so_n,
                     scale, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     STAGES: tl.constexpr):
    """o = softmax(q k^T * scale) v for one (batch, head) and BLOCK_M queries. q (B, N, heads * D), k and v
    (B, M, heads * D), o (B, N, heads * D): head h is columns [h D, (h+1) D) of each token's row, tokens at the
    given strides (so q, k, v may be views of one fused projection). D is padded to D_PAD with zeros in the loads.
    The online softmax of FlashAttention-2 (Dao, arXiv 2307.08691, Algorithm 1): scores in float32, in base 2
    (scale times log2 e), p rounded to the input dtype for the second product, as cuDNN's and PyTorch's kernels
    do; the row sums l in float32, divided out once at the end."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries
    d = tl.arange(0, D_PAD)
    dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + rows[:, None] * sq_n + h * D + d[None, :],
                mask=(rows < N)[:, None] & dm[None, :], other=0.0)  # (BLOCK_M, D_PAD)
    k_base = k_ptr + b.to(tl.int64) * sk_b + h * D
    v_base = v_ptr + b.to(tl.int64) * sv_b + h * D
    qk_scale = scale * 1.4426950408889634  # e^s = 2^(s log2 e)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # the running row maximum, in base 2
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # the running row sum of 2^(s - m)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start in tl.range(0, M, BLOCK_N, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
        cm = cols < M
        k = tl.load(k_base + cols[None, :] * sk_n + d[:, None], mask=dm[:, None] & cm[None, :],
                    other=0.0)  # (D_PAD, BLOCK_N)
        s = tl.where(cm[None, :], tl.dot(q, k), float("-inf"))  # (BLOCK_M, BLOCK_N), float32
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * sv_n + d[None, :], mask=cm[:, None] & dm[None, :],
                    other=0.0)  # (BLOCK_N, D_PAD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b.to(tl.int64) * so_b + rows[:, None] * so_n + h * D + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None] & dm[None, :])
