"""The Triton side of `guided_step.py` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def guided_step(e_ptr, x_ptr, y_ptr, z_ptr, p_ptr, m_ptr, l_ptr, q_ptr, r_ptr, k_ptr, n_ptr, N, B, C, H, W,
                e0, e1, e2, e3, x0, x1, x2, x3, y0, y1, y2, y3, z0, z1, z2, z3, p0, p1, p2, p3,
                l0, l1, l2, l3, q0, q1, q2, q3, r0, r1, r2, r3, n0, n1, n2, n3,
                w, cx, cm, ci, px, pg, cp, cq, cr, kl, kp, kq, kr, km, cn,
                BLOCK: tl.constexpr, STACK: tl.constexpr, CONVERT: tl.constexpr, ADDEND: tl.constexpr,
                ADDEND2: tl.constexpr, ADDEND3: tl.constexpr, CORRECT: tl.constexpr, THIRD: tl.constexpr,
                NOISE: tl.constexpr):
    """N = B*C*H*W values of the (B, C, H, W) sample x, in logical order; each tensor read or written at its own
    strides (the UNet's output is channels last, the latents need not be). eps (2B, C, H, W): unconditional rows
    b, text rows B + b. g = u + w (t - u); m = g, or with CONVERT px x + pg g, stored to m_ptr (at y's strides) as
    the solver's history; with CORRECT (UniPC's corrector), x is replaced by kl l + kp p (+ kq q with ADDEND2)
    (+ kr r with THIRD: the m before q) + km m, stored to k_ptr (at y's strides) and read back as stored;
    y = cx x + cm m (+ cp p with ADDEND: the multistep solvers' previous m) (+ cq q with ADDEND2: the m before that)
    (+ cr r with ADDEND3, never with CORRECT: PLMS's m before q) (+ cn n with NOISE: Euler a's and SDE DPM-Solver's
    noise, any dtype), all in float32. With STACK, z (2B, C, H, W) gets ci y (y as stored, scaled in float32) at rows
    b and B + b."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = i < N
    iw = i % W
    ih = (i // W) % H
    ic = (i // (W * H)) % C
    ib = i // (W * H * C)
    e = e_ptr + ic * e1 + ih * e2 + iw * e3
    u = tl.load(e + ib * e0, mask=msk, other=0.0).to(tl.float32)
    t = tl.load(e + (ib + B) * e0, mask=msk, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + ib * x0 + ic * x1 + ih * x2 + iw * x3, mask=msk, other=0.0).to(tl.float32)
    m = u + w * (t - u)
    y_at = ib * y0 + ic * y1 + ih * y2 + iw * y3
    if CONVERT:
        m = px * x + pg * m
        tl.store(m_ptr + y_at, m.to(m_ptr.dtype.element_ty), mask=msk)
    if ADDEND:
        p = tl.load(p_ptr + ib * p0 + ic * p1 + ih * p2 + iw * p3, mask=msk, other=0.0).to(tl.float32)
    if ADDEND2:
        q = tl.load(q_ptr + ib * q0 + ic * q1 + ih * q2 + iw * q3, mask=msk, other=0.0).to(tl.float32)
    if CORRECT:
        last = tl.load(l_ptr + ib * l0 + ic * l1 + ih * l2 + iw * l3, mask=msk, other=0.0).to(tl.float32)
        k = kl * last + kp * p + km * m
        if ADDEND2:
            k += kq * q
        if THIRD:
            k += kr * tl.load(r_ptr + ib * r0 + ic * r1 + ih * r2 + iw * r3, mask=msk, other=0.0).to(tl.float32)
        k = k.to(k_ptr.dtype.element_ty)
        tl.store(k_ptr + y_at, k, mask=msk)
        x = k.to(tl.float32)
    y = cx * x + cm * m
    if ADDEND:
        y += cp * p
    if ADDEND2:
        y += cq * q
    if ADDEND3:
        y += cr * tl.load(r_ptr + ib * r0 + ic * r1 + ih * r2 + iw * r3, mask=msk, other=0.0).to(tl.float32)
    if NOISE:
        y += cn * tl.load(n_ptr + ib * n0 + ic * n1 + ih * n2 + iw * n3, mask=msk, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_at, y, mask=msk)
    if STACK:
        z = z_ptr + ic * z1 + ih * z2 + iw * z3
        s = (y.to(tl.float32) * ci).to(z_ptr.dtype.element_ty)
        tl.store(z + ib * z0, s, mask=msk)
        tl.store(z + (ib + B) * z0, s, mask=msk)
