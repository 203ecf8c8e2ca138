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


@triton.jit
def geglu_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, D, K, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y = a * gelu(g), [a, g] = x @ w.T + b: x (M, K), w (2D, K) (nn.Linear's weight, rows [0, D) for a and
    [D, 2D) for g), y (M, D), all row-major. One program makes a (BLOCK_M, BLOCK_N) tile of y from two
    accumulators, the value half's and the gate's, fed by the same tile of x."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N)
    # programs in groups of GROUP_M row tiles, so the weight tiles they read stay in L2 between them
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x and y
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) columns of y: weight rows rn (value) and D + rn (gate)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < D
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]  # (BM, BK)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # (BK, BN): w.T's tile, value half
    gate_offset = D.to(tl.int64) * K  # the gate half's rows start D rows further
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            wa = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            wg = tl.load(w_ptrs + gate_offset, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = rk < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wa = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wg = tl.load(w_ptrs + gate_offset, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_a = tl.dot(x, wa, acc_a)  # (BM, BN), float32
        acc_g = tl.dot(x, wg, acc_g)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + D + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # the projection rounded to the output dtype, as the reference's linear layer stores it; then the gate
    a = acc_a.to(y_ptr.dtype.element_ty).to(tl.float32)
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * D + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
