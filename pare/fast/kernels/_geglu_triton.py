"""The Triton side of `geglu.py`: the gate on a stored projection, and the projection's GEMM with the gate."""

import triton
import triton.language as tl


@triton.jit
def geglu_kernel(x_ptr, y_ptr, rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """y = a * gelu(g), [a, g] = x: x is (rows, 2D) row-major, y is (rows, D)."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    base = r[:, None].to(tl.int64) * (2 * D) + c[None, :]
    a = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + base + D, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    tl.store(y_ptr + r[:, None].to(tl.int64) * D + c[None, :], (a * gelu).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def geglu_linear_kernel(x_desc, w_desc, b_ptr, y_ptr, M, D, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    """y = a * gelu(g), [a, g] = x @ w.T + b: x (M, K), w (2D, K) (nn.Linear's weight: rows [0, D) make a, rows
    [D, 2D) make g), y (M, D), all row-major. One program makes a (BLOCK_M, BLOCK_N) tile of y from two float32
    accumulators, the value half's and the gate half's, fed by the same tile of x.
    The tiles of x and w are loaded by the tensor memory accelerator (TMA, Hopper on): x_desc over x in
    (BLOCK_M, BLOCK_K) boxes, w_desc over w in (BLOCK_N, BLOCK_K) boxes. A box past an edge reads zeros, so the
    loads need no masks; a value tile past D reads gate rows, and those columns are not stored."""
    pid = tl.program_id(0)
    # programs in groups of GROUP_M row tiles, so the weight tiles they read stay in L2 between them
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        x = x_desc.load([off_m, k * BLOCK_K])  # (BM, BK)
        wa = w_desc.load([off_n, k * BLOCK_K])  # (BN, BK): value rows
        wg = w_desc.load([D + off_n, k * BLOCK_K])  # (BN, BK): gate rows
        acc_a = tl.dot(x, wa.T, acc_a)  # (BM, BN), float32
        acc_g = tl.dot(x, wg.T, acc_g)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + D + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    a = acc_a.to(y_ptr.dtype.element_ty).to(tl.float32)
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * D + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok[None, :])
