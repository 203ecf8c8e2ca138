"""Classifier-free guidance and a DDIM, Euler, Euler ancestral, DPM-Solver++ (2M, 3M), UniPC (to 3M), DEIS, PLMS or LMS
step in one launch, which also writes the next UNet input.

Replaces, in the denoising loop (`pare/pipelines/stable_diffusion.py denoise`, through `pare/fast/denoise.py`):
- the guidance line eps = eps_u + w (eps_c - eps_u) (Ho & Salimans, arXiv 2207.12598, eq. 6);
- `pare/schedulers/scheduling_ddim.py DDIMScheduler.step` with eta = 0 (Song et al., arXiv 2010.02502, eq. 12),
  `scheduling_euler_discrete.py EulerDiscreteScheduler.step` without churn (Karras et al., arXiv 2206.00364,
  Algorithm 2 with gamma = 0), or `scheduling_dpmsolver_multistep.py DPMSolverMultistepScheduler.step` of
  DPM-Solver++ to third order (Lu et al., arXiv 2211.01095, section 4 and Algorithm 2, and its SDE of section 5),
  midpoint or heun, or
  `scheduling_euler_ancestral_discrete.py EulerAncestralDiscreteScheduler.step` (k-diffusion's ancestral Euler), or
  `scheduling_unipc_multistep.py UniPCMultistepScheduler.step` to third order with its data prediction (Zhao et
  al., arXiv 2302.04867: the corrector UniC, then the predictor UniP), or
  `scheduling_deis_multistep.py DEISMultistepScheduler.step` to third order (Zhang & Chen, arXiv 2204.13902,
  rhoAB-DEIS), or `scheduling_pndm.py PNDMScheduler.step` with `skip_prk_steps` (PLMS: Liu et al., arXiv 2202.09778,
  eqs. 9 and 13, SD 1.x's folders' sampler), or `scheduling_lms_discrete.py LMSDiscreteScheduler.step`
  (k-diffusion's `sample_lms`, order 4);
- the next step's `torch.cat([latents] * 2)` and `scale_model_input` (Euler's x / sqrt(sigma^2 + 1); DDIM's is 1).

Math. With the guided output m and the sample x, a DDIM step with eta = 0 is linear in (x, m):
x_{t-1} = c_x x + c_m m, where (a = alpha_t, a' = alpha_{t-1}, DDIM's alpha_bar)
    epsilon prediction:  x_0 = (x - sqrt(1 - a) m) / sqrt(a),  eps = m
    v prediction:        x_0 = sqrt(a) x - sqrt(1 - a) m,       eps = sqrt(a) m + sqrt(1 - a) x
    x_{t-1} = sqrt(a') x_0 + sqrt(1 - a') eps                   (eq. 12, sigma_t = 0)
An Euler step from sigma to sigma' is linear too (dt = sigma' - sigma, EDM's VP preconditioning):
    epsilon prediction:  x' = x + dt m
    v prediction:        D = x / (sigma^2 + 1) - sigma m / sqrt(sigma^2 + 1),  x' = x + dt (x - D) / sigma
Euler ancestral is an Euler step to sigma_down = sigma'^2 / sigma, plus sigma_up z, sigma_up^2 = sigma'^2 - sigma_down^2
(z the noise its step draws): euler_coefficients(sigma, sigma_down), and c_z = sigma_up.
A DPM-Solver++ step is linear in x, its data prediction m0 and the previous step's m1 (sigma the Karras noise level,
alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t the VP coefficients, lambda = -log sigma, so that
e^-h = sigma' / sigma):
    epsilon prediction:  m0 = (x - sigma_t m) / alpha_t         v prediction:  m0 = alpha_t x - sigma_t m
    first order:         x' = (sigma_t' / sigma_t) x + b m0,                   b = alpha_t' (1 - e^-h)
    2M, midpoint:        x' = (sigma_t' / sigma_t) x + b m0 + (b / 2) D1,      D1 = (m0 - m1) / r0, r0 = h_prev / h
    2M, heun:            x' = (sigma_t' / sigma_t) x + b m0 + alpha_t' ((e^-h - 1) / h + 1) D1
    2M SDE ("DPM++ 2M SDE"): x' = (sigma_t' / sigma_t) e^-h x + b m0 + d D1 + sigma_t' sqrt(1 - e^-2h) z,
                         b = alpha_t' (1 - e^-2h), d = b / 2 (midpoint) or alpha_t' ((1 - e^-2h) / (-2h) + 1) (heun),
                         z drawn as its step draws it (float32)
    3M (and 3M SDE):     x' = c_x x + b m0 + d1 D1 + d2 D2 (+ the SDE's noise), with D1, D2 the divided differences of
                         (m0, m1, m2) that the scheduler's third-order update forms (r1 = h_prev2 / h), and d1, d2 that
                         update's coefficients; still linear, in x, m0, m1 and m2
The kernel writes m0 too, in the sample's dtype as the scheduler's history keeps it (`model_outputs`), and reads m1
(and m2) from there. A UniPC step (data prediction m0 as above; e^-h, alpha_t and sigma_t as for DPM-Solver; B(h) = -h for
"bh1", e^-h - 1 for "bh2", at the step's h) is two such maps. Its corrector first redoes the last step, from the
sample L it started at (sigma_{i-1}) to sigma_i, with m0 as one more point (r = 1), and m2, m3 before m1 at orders 2
and 3 (r_k = (lambda_{i-1-k} - lambda_{i-1}) / h):
    x_c = (sigma_t / sigma_s) L - alpha_t (e^-h - 1) m1 - alpha_t B(h) (sum_k rho_k (m_{k+1} - m1) / r_k + rho_t (m0 - m1)),
with rho_t = 1/2 at order 1, and (rho_k, rho_t) solving the order conditions R rho = b (R_jk = r_k^(j-1), r = 1 for
rho_t; b_j = (j-1)! phi_j(-h) / B(h)) at orders 2 and 3. Its predictor steps from x_c, with m1 and m2 before m0
(r_k = (lambda_{i-k} - lambda_i) / h), rho = 1/2 at order 2 and the first two order conditions at order 3:
    x' = (sigma_t' / sigma_t) x_c - alpha_t' (e^-h - 1) m0 - alpha_t' B(h) sum_k rho_k (m_k - m0) / r_k.
m0 is converted at the uncorrected sample, as UniPC's step converts it. The kernel writes x_c too: the scheduler's
`last_sample`, which the next corrector starts from.
A DEIS step (rho = sigma_t / alpha_t, which is the Karras sigma) integrates the Lagrange polynomial through the last
1, 2 or 3 eps, in log rho, over rho: x' = alpha_t' (x / alpha_t + sum_j C_j m_j), C_j = int_{rho}^{rho'} l_j(log r) dr.
With u = log r the integrand is l_j(u) e^u, and e^u (p - p' + p'' - ...) is an antiderivative of p(u) e^u for any
polynomial p: so c_x = alpha_t' / alpha_t and the c's of m0, m1, m2 are alpha_t' C_j. Its history keeps eps, which it
re-derives from its x_0: m0 = m (epsilon prediction), m0 = sigma_t x + alpha_t m (v prediction).
A PLMS step is DDIM's transfer phi (Liu et al., eq. 9) of the Adams-Bashforth sum e' = sum_j w_j m_j over the guided
output and up to three kept before it (m1, m2, m3: its `ets`, the raw outputs), so x' = c_x x + c_m m + c_1 m1 + c_2 m2
+ c_3 m3; its second call redoes the first step from the sample that step started at, with e' = (m + m1) / 2.
An LMS step is Adams-Bashforth in sigma: x' = x + sum_j c_j d_j over the derivative d = (x - D) / sigma of the guided
output (epsilon: m itself; v: sigma x / (sigma^2 + 1) + m / sqrt(sigma^2 + 1)) and up to three kept before it, c_j the
scheduler's integrals of its Lagrange basis (`lms_coefficient`, exact in float64); the kernel writes d for its history.
`ddim_coefficients`, `euler_coefficients`, `ancestral_coefficients`, `dpm_coefficients` (the SDE's too),
`unipc_coefficients`, `deis_coefficients` and `pndm_coefficients` solve the coefficients in float64 on the host; the
kernel reads each value once, in float32 registers.

Why a kernel: the reference spends about ten launches a step on (B, 4, h, w) latents (guidance's subtract,
multiply and add; the step's six multiplies, adds and divides; the next input's cat), each a few microseconds of
a step in which the GPU mostly waits on them. One launch replaces them. The values are not the reference's to the
bit: the reference rounds each of those ops to the latents' float16, this rounds once, so it is nearer float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._guided_step_triton import guided_step as guided_step_kernel

FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # the noise's dtypes the kernel reads
BLOCK = 1024  # values per program: SD1.5's 512-px latents (16384 a half) in 16 programs
TRITON_STEP = 1  # 0: the same arithmetic by PyTorch ops (the A/B's switch)


def ddim_coefficients(alpha_t: float, alpha_prev: float, prediction_type: str) -> tuple[float, float]:
    """(c_x, c_m) of x_{t-1} = c_x x + c_m m, a DDIM step with eta = 0 (see the module docstring), in float64."""
    sa, sb = math.sqrt(alpha_t), math.sqrt(1.0 - alpha_t)  # sqrt(a), sqrt(1 - a)
    sa_prev, sb_prev = math.sqrt(alpha_prev), math.sqrt(1.0 - alpha_prev)
    if prediction_type == "epsilon":  # x_0 = x / sa - (sb / sa) m
        return sa_prev / sa, sb_prev - sa_prev * sb / sa
    if prediction_type == "v_prediction":  # x_0 = sa x - sb m, eps = sb x + sa m
        return sa_prev * sa + sb_prev * sb, sb_prev * sa - sa_prev * sb
    raise ValueError(f"ddim_coefficients: prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
"""PLMS's e' = sum_j w_j e_j over its outputs, newest first: Adams-Bashforth of orders 1 to 4 (Liu et al., eq. 13)."""
PLMS_HEUN = (1 / 2, 1 / 2)  # its second call redoes the first step with e' = (e_1 + e_0) / 2 (pseudo improved Euler)


def pndm_coefficients(alpha_t: float, alpha_prev: float, weights: tuple[float, ...], prediction_type: str
                      ) -> tuple[float, tuple[float, float, float, float]]:
    """(c_x, (c_m, c_1, c_2, c_3)) of a PLMS step x' = phi(x, sum_j w_j e_j, t, t') = c_x x + c_m m + c_1 m1 + c_2 m2 +
    c_3 m3 (Liu et al., arXiv 2202.09778, eq. 9), m the guided output and m1, m2, m3 the ones kept before it,
    `weights` those of (m, m1, ...), in float64. phi is DDIM's step with eta 0 (`PNDMScheduler._get_prev_sample`
    rearranges it), and a v prediction is turned into eps after the sum, at the sample stepped from, as DDIM's step
    turns it: so `ddim_coefficients`, its c_m spread over the weights."""
    if not 1 <= len(weights) <= 4:
        raise ValueError(f"pndm_coefficients: {len(weights)} weights; PLMS combines 1 to 4 outputs")
    c_x, c_m = ddim_coefficients(alpha_t, alpha_prev, prediction_type)
    c = [c_m * w for w in weights] + [0.0] * (4 - len(weights))
    return c_x, (c[0], c[1], c[2], c[3])


def derivative(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(p_x, p_g) of the ODE's derivative d = (x - D) / sigma = p_x x + p_g m at the Karras noise level sigma (D the
    denoised of EDM's VP preconditioning), from an epsilon or v prediction m, in float64: Euler's and LMS's d."""
    if prediction_type == "epsilon":  # D = x - sigma m: d = m
        return 0.0, 1.0
    if prediction_type == "v_prediction":  # D = x / (sigma^2 + 1) - sigma m / sqrt(sigma^2 + 1)
        return sigma / (sigma**2 + 1), 1 / math.sqrt(sigma**2 + 1)
    raise ValueError(f"derivative: prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def euler_coefficients(sigma: float, sigma_next: float, prediction_type: str) -> tuple[float, float]:
    """(c_x, c_m) of x' = c_x x + c_m m = x + (sigma_next - sigma) d, an Euler step from sigma to sigma_next without
    churn, in float64."""
    dt = sigma_next - sigma
    p_x, p_g = derivative(sigma, prediction_type)
    return 1.0 + dt * p_x, dt * p_g


def ancestral_coefficients(sigma: float, sigma_next: float, prediction_type: str) -> tuple[float, float, float]:
    """(c_x, c_m, c_z) of x' = c_x x + c_m m + c_z z, an ancestral Euler step from sigma to sigma_next (k-diffusion's
    `get_ancestral_step` with eta 1: sigma_down = sigma_next^2 / sigma, exactly), in float64."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return (*euler_coefficients(sigma, sigma_next**2 / sigma, prediction_type), sigma_up)


def data_prediction(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(p_x, p_g) of the data prediction m0 = p_x x + p_g m at the Karras noise level sigma (VP alpha_t = 1 / sqrt(sigma^2
    + 1), sigma_t = sigma alpha_t), from an epsilon or v prediction m, in float64."""
    alpha = 1 / math.sqrt(sigma**2 + 1)
    if prediction_type == "epsilon":  # m0 = (x - sigma_t m) / alpha_t, sigma_t / alpha_t = sigma
        return 1 / alpha, -sigma
    if prediction_type == "v_prediction":  # m0 = alpha_t x - sigma_t m
        return alpha, -sigma * alpha
    raise ValueError(f"data_prediction: prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def dpm_coefficients(sigma: float, sigma_next: float, sigma_prev: float | None, order: int, solver_type: str,
                     prediction_type: str, sde: bool = False, sigma_prev2: float | None = None
                     ) -> tuple[tuple[float, float], float, float, float, float, float]:
    """((p_x, p_g), c_x, c_m, c_p, c_q, c_z) of a DPM-Solver++ step from sigma to sigma_next (Karras noise levels) of
    order 0 (a step of zero length, or for the SDE of negative length: the ODE's first-order step), 1, 2 (from the
    previous level sigma_prev) or 3 (and the one before, sigma_prev2): m0 = p_x x + p_g m, then
    x' = c_x x + c_m m0 + c_p m1 + c_q m2 + c_z z (see the module docstring), in float64. sde: the SDE (section 5),
    which is the ODE's step with e^-2h for e^-h, c_x times e^-h, and the noise z; c_z = 0 otherwise. c_q = 0 below
    third order; c_p = 0 below second."""
    alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)  # VP alpha_t
    convert = data_prediction(sigma, prediction_type)
    decay = sigma_next / sigma  # e^-h
    c_x = (sigma_next * alpha_next) / (sigma * alpha)  # sigma_t' / sigma_t
    sde = sde and order > 0
    e, c_z = decay, 0.0  # the ODE's e^-h
    if sde:  # e^-2h; sigma_t' / sigma_t e^-h; sigma_t' sqrt(1 - e^-2h)
        e, c_x, c_z = decay**2, c_x * decay, sigma_next * alpha_next * math.sqrt(1 - decay**2)
    b = alpha_next * (1 - e)
    if order <= 1:
        return convert, c_x, b, 0.0, 0.0, c_z
    if order not in (2, 3):
        raise ValueError(f"dpm_coefficients: order {order}; the fused step takes orders 0 to 3")
    h, h_prev = math.log(sigma / sigma_next), math.log(sigma_prev / sigma)
    hk = 2 * h if sde else h  # the exponent's step: 2h for the SDE
    if order == 2:
        d1 = 0.5 * b if solver_type == "midpoint" else alpha_next * ((e - 1) / hk + 1)  # D1's coefficient
        k = d1 * h / h_prev  # d1 / r0: D1 = (m0 - m1) / r0
        return convert, c_x, b + k, -k, 0.0, c_z
    # 3M: x' = c_x x + b D0 + d1 D1 + d2 D2, D1 = (1 + f) D1_0 - f D1_1, D2 = g (D1_0 - D1_1), f = r0 / (r0 + r1),
    # g = 1 / (r0 + r1), D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1 (its step's divided differences, as written there)
    r0, r1 = h_prev / h, math.log(sigma_prev2 / sigma_prev) / h
    d1 = alpha_next * ((e - 1) / hk + 1)
    d2 = alpha_next * ((1 - e - hk) / hk**2 - 0.5) if sde else -alpha_next * ((e - 1 + h) / h**2 - 0.5)
    f, g = r0 / (r0 + r1), 1 / (r0 + r1)
    k0, k1 = (d1 * (1 + f) + d2 * g) / r0, (d1 * f + d2 * g) / r1  # of D1_0 and D1_1, divided by r0 and r1
    return convert, c_x, b + k0, -k0 - k1, k1, c_z


def deis_coefficients(sigmas: tuple[float, ...], sigma_next: float, prediction_type: str
                      ) -> tuple[tuple[float, float], float, float, float, float]:
    """((p_x, p_g), c_x, c_m, c_p, c_q) of a DEIS step (log-rho Lagrange nodes) from sigmas[0] to sigma_next, of order
    len(sigmas) (1 to 3; sigmas = (sigma_i, sigma_{i-1}, sigma_{i-2}): the levels of m0, m1, m2, Karras sigmas = rho):
    m0 = p_x x + p_g m (its eps, as its history keeps it), then x' = c_x x + c_m m0 + c_p m1 + c_q m2 (see the module
    docstring), in float64."""
    if not 1 <= len(sigmas) <= 3:
        raise ValueError(f"deis_coefficients: order {len(sigmas)}; the fused step takes orders 1 to 3")
    alpha, alpha_next = 1 / math.sqrt(sigmas[0] ** 2 + 1), 1 / math.sqrt(sigma_next**2 + 1)  # VP alpha_t
    if prediction_type == "epsilon":  # eps = (x - alpha_t x_0) / sigma_t with x_0 from eps: eps itself
        convert = (0.0, 1.0)
    elif prediction_type == "v_prediction":  # x_0 = alpha_t x - sigma_t v -> eps = sigma_t x + alpha_t v
        convert = (sigmas[0] * alpha, alpha)
    else:
        raise ValueError(f"deis_coefficients: prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")
    nodes = [math.log(r) for r in sigmas]  # u_j = log rho_j
    c = [alpha_next * exp_poly_integral(lagrange_basis(nodes, j), nodes[0], math.log(sigma_next))
         for j in range(len(nodes))] + [0.0] * (3 - len(nodes))  # of m0, m1, m2; 0 beyond the order
    return convert, alpha_next / alpha, c[0], c[1], c[2]


def lagrange_basis(nodes: list[float], j: int) -> list[float]:
    """l_j(u) = prod_{k != j} (u - u_k) / (u_j - u_k): its coefficients, lowest power first."""
    poly = [1.0]
    for k, u_k in enumerate(nodes):
        if k != j:  # times (u - u_k) / (u_j - u_k)
            poly = [(up - u_k * same) / (nodes[j] - u_k) for up, same in zip([0.0] + poly, poly + [0.0])]
    return poly


def exp_poly_integral(poly: list[float], a: float, b: float) -> float:
    """int_a^b p(u) e^u du for a polynomial p (coefficients, lowest power first): e^u (p - p' + p'' - ...) is an
    antiderivative (its derivative telescopes to p e^u)."""
    signed, term, sign = [0.0] * len(poly), list(poly), 1.0
    while term:  # term[i]: the coefficient of u^i of the next derivative
        for i, t in enumerate(term):
            signed[i] += sign * t
        term, sign = [i * t for i, t in enumerate(term)][1:], -sign
    value = lambda u: math.exp(u) * sum(t * u**i for i, t in enumerate(signed))  # noqa: E731
    return value(b) - value(a)


def unipc_coefficients(sigmas: tuple[float, ...], corrector_order: int, order: int, solver_type: str
                       ) -> tuple[tuple[float, float, float, float, float] | None, tuple[float, float, float, float]]:
    """(q, (c_x, c_m, c_p, c_q)) of a UniPC step at sigma = sigmas[3] (data prediction, B(h) = -h for "bh1", e^-h - 1
    for "bh2", at the step's h; see the module docstring), in float64. sigmas: (sigma_{i-3}, sigma_{i-2},
    sigma_{i-1}, sigma_i, sigma_{i+1}), the Karras levels about the step (those no order reaches unused).
    corrector_order: 0 (no corrector) to 3; order: the predictor's, 1 to 3. q = (q_l, q_1, q_2, q_3, q_m): the
    corrected sample q_l L + q_1 m1 + q_2 m2 + q_3 m3 + q_m m0, or None where nothing is corrected; then
    x' = c_x x + c_m m0 + c_p m1 + c_q m2."""
    lam = lambda s: math.inf if s == 0 else -math.log(s)  # noqa: E731 (lambda_t = log(alpha_t / sigma_t) = -log sigma)
    vp = lambda s: (1 / math.sqrt(s**2 + 1), s / math.sqrt(s**2 + 1))  # noqa: E731 (alpha_t, sigma_t)
    factor = lambda hh: hh if solver_type == "bh1" else math.expm1(hh)  # noqa: E731 (B(h), at hh = -h)

    def first_order(s0: float, t: float):  # (sigma_t / sigma_s0, -alpha_t (e^-h - 1), alpha_t B(h), h) from s0 to t
        (_, ss0), (at, st) = vp(s0), vp(t)
        h = lam(t) - lam(s0)
        return st / ss0, -at * math.expm1(-h), at * factor(-h), h

    def rhos(rks: list[float], h: float) -> list[float]:
        """The weights solving R rho = b, R_kj = r_j^(k-1), b_k = (k-1)! phi_k(hh) / B(h) with phi_1's h phi_1(hh) =
        e^hh - 1 and phi_{k+1}(hh) = (phi_k(hh) - 1 / k!) / hh, k = 1 .. len(rks) (the order conditions)."""
        hh, b, phi, fact = -h, [], math.expm1(-h) / -h - 1, 1.0  # phi: h phi_2(hh) at first, then the next
        for k in range(1, len(rks) + 1):
            b.append(phi * fact / factor(hh))
            fact *= k + 1
            phi = phi / hh - 1 / fact
        return np.linalg.solve(np.array([[r ** k for r in rks] for k in range(len(rks))]), np.array(b)).tolist()

    s3, s2, s1, s, s_next = sigmas
    q = None
    if corrector_order:  # UniC from sigma_{i-1} to sigma_i: the new m0 at the far end (r = 1), m2 and m3 before m1
        q_l, q_1, ab, h = first_order(s1, s)
        if h != 0:  # over a step of zero length there is nothing to correct
            # x_c = q_l L + q_1 m1 - ab (sum_k rho_k (m_{k+1} - m1) / r_k + rho_t (m0 - m1)), r_k = (lambda_{i-1-k} -
            # lambda_{i-1}) / h; rho_t = 1/2 at order 1 (the trapezoid), else all weights from the order conditions
            rks = [(lam(sk) - lam(s1)) / h for sk in (s2, s3)[:corrector_order - 1]]
            *rho, rho_t = rhos(rks + [1.0], h) if corrector_order > 1 else [0.5]
            ks = [-ab * r / rk for r, rk in zip(rho, rks)] + [0.0] * (3 - corrector_order)  # of m2, m3
            q = (q_l, q_1 - sum(ks) + ab * rho_t, ks[0], ks[1], -ab * rho_t)
    c_x, c_m, ab, h = first_order(s, s_next)  # UniP from sigma_i to sigma_{i+1}
    if h == 0:
        return q, (1.0, 0.0, 0.0, 0.0)  # a step of zero length returns its sample
    # x' = c_x x + c_m m0 - ab sum_k rho_k (m_k - m0) / r_k, r_k = (lambda_{i-k} - lambda_i) / h, k < order; rho = 1/2
    # at order 2 (UniPC's choice), else from the order conditions of the first order - 1 rows
    rks = [(lam(sk) - lam(s)) / h for sk in (s1, s2)[:order - 1]]
    rho = rhos(rks, h) if order == 3 else [0.5] * (order - 1)
    ks = [-ab * r / rk for r, rk in zip(rho, rks)] + [0.0] * (3 - order)  # of m1, m2
    return q, (c_x, c_m - sum(ks), ks[0], ks[1])


class Stepped(NamedTuple):
    """What `guided_step` writes: the stepped sample; the next UNet input (or None); the data prediction m0 (with
    `convert`, else None); and the corrected sample (with `correct`, UniPC's, else None)."""
    sample: torch.Tensor
    next_input: torch.Tensor | None
    kept: torch.Tensor | None
    corrected: torch.Tensor | None


def guided_step(noise_pred: torch.Tensor, sample: torch.Tensor, guidance_scale: float, c_x: float, c_m: float,
                next_input: bool = True, next_scale: float = 1.0, convert: tuple[float, float] | None = None,
                addend: torch.Tensor | None = None, c_add: float = 0.0,
                correct: tuple[torch.Tensor, torch.Tensor | None, tuple[float, float, float, float, float]] | None = None,
                noise: torch.Tensor | None = None, c_noise: float = 0.0, addend2: torch.Tensor | None = None,
                c_add2: float = 0.0, addend3: torch.Tensor | None = None, c_add3: float = 0.0) -> Stepped:
    """(2B, C, h, w) UNet output (unconditional half first) and (B, C, h, w) sample -> the stepped sample, in the
    sample's dtype and layout; (next_input) the next UNet input (2B, C, h, w): the stepped sample twice, times
    `next_scale` (the next step's `scale_model_input`), as the reference's cat and scaling make it; and with
    `convert` = (p_x, p_g) the converted output m0 = p_x x + p_g m of the guided output m (a multistep solver's data
    prediction, in the sample's dtype), else None. The step is c_x x + c_m m0 (m0 = m without `convert`), plus
    c_add `addend` where given (a multistep solver's previous m0, m1), plus c_add2 `addend2` where given (the m0
    before that, m2; with `addend`), plus c_add3 `addend3` where given (PLMS's m3; with `addend2`, not with `correct`),
    plus c_noise `noise` where given (Euler a's and SDE DPM-Solver's, drawn as their
    steps draw it: in any floating dtype), each of the sample's shape.
    correct = (L, m3, (q_l, q_1, q_2, q_3, q_m)), UniPC's corrector (needs `convert`, the addend m1, and addend2 m2
    where q_2 != 0): the sample is first replaced by x_c = q_l L + q_1 m1 + q_2 m2 + q_3 m3 + q_m m0 (L the last
    sample before the last predictor, m3 the output before m2, or None where q_3 = 0), which is written too (as the
    sample's dtype rounds it, the value the step then reads). One Triton launch on CUDA; PyTorch's ops elsewhere
    (float32 arithmetic for 16-bit values, the sample's own dtype otherwise)."""
    b = sample.shape[0]
    if noise_pred.ndim != 4 or sample.ndim != 4 or noise_pred.shape[0] != 2 * b or noise_pred.shape[1:] != sample.shape[1:]:
        raise ValueError(f"guided_step: a (2B, C, h, w) UNet output and a (B, C, h, w) sample, got "
                         f"{tuple(noise_pred.shape)} and {tuple(sample.shape)}")
    last, m3, (q_l, q_1, q_2, q_3, q_m) = correct if correct is not None else (None, None, (0.0,) * 5)
    if correct is not None and (convert is None or addend is None or (addend2 is None and q_2 != 0.0)
                                or (m3 is None) != (q_3 == 0.0)):
        raise ValueError("guided_step: a correction needs convert, the addend m1, addend2 where q_2 != 0, and m3 "
                         "exactly where q_3 != 0")
    if addend2 is not None and addend is None:
        raise ValueError("guided_step: a second addend needs the first")
    if addend3 is not None and (addend2 is None or correct is not None):
        raise ValueError("guided_step: a third addend needs the second, and no correction (they share a pointer)")
    for name, t in (("addend", addend), ("addend2", addend2), ("addend3", addend3), ("last sample", last), ("m3", m3),
                    ("noise", noise)):
        if t is not None and t.shape != sample.shape:
            raise ValueError(f"guided_step: {name} {tuple(t.shape)} is not of the sample's shape {tuple(sample.shape)}")
    out = torch.empty_like(sample)  # the sample's layout
    converted = torch.empty_like(sample) if convert is not None else None
    corrected = torch.empty_like(sample) if correct is not None else None
    p_x, p_g = convert if convert is not None else (0.0, 1.0)
    inputs = [t for t in (noise_pred, addend, addend2, addend3, last, m3) if t is not None]
    if (TRITON_STEP and triton_ready(sample) and all(t.dtype == sample.dtype and t.device == sample.device for t in inputs)
            and (noise is None or (noise.device == sample.device and noise.dtype in FLOATS))):
        stacked = sample.new_empty((2 * b, *sample.shape[1:])) if next_input else None  # (2B, C, h, w), contiguous
        n = sample.numel()
        dst = stacked if next_input else out  # unused without a next input (STACK off): only its strides are read
        # dummy pointers where a term is off (ADDEND, ADDEND2, ADDEND3, CORRECT, THIRD, NOISE): never read; the
        # corrector's m3 and PLMS's third addend share a pointer (never both)
        third = m3 if m3 is not None else addend3
        add, add2, last_, m3_, noise_ = (t if t is not None else sample for t in (addend, addend2, last, third, noise))
        guided_step_kernel[(triton.cdiv(n, BLOCK),)](
            noise_pred, sample, out, dst, add, converted if converted is not None else out, last_, add2, m3_,
            corrected if corrected is not None else out, noise_, n, b, *sample.shape[1:],
            *noise_pred.stride(), *sample.stride(), *out.stride(), *dst.stride(), *add.stride(), *last_.stride(),
            *add2.stride(), *m3_.stride(), *noise_.stride(), float(guidance_scale), float(c_x), float(c_m),
            float(next_scale), float(p_x), float(p_g), float(c_add), float(c_add2), float(c_add3), float(q_l),
            float(q_1), float(q_2), float(q_3), float(q_m), float(c_noise),
            BLOCK=BLOCK, STACK=next_input, CONVERT=convert is not None, ADDEND=addend is not None,
            ADDEND2=addend2 is not None, ADDEND3=addend3 is not None, CORRECT=correct is not None,
            THIRD=m3 is not None, NOISE=noise is not None,
            num_warps=4)
        return Stepped(out, stacked, converted, corrected)
    compute = torch.float32 if sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
    uncond, text = noise_pred.to(compute).chunk(2)  # (2B, ...) -> 2 x (B, ...)
    guided = uncond + guidance_scale * (text - uncond)
    x = sample.to(compute)
    if convert is not None:
        guided = p_x * x + p_g * guided
        converted.copy_(guided)
    if correct is not None:
        fixed = q_l * last.to(compute) + q_1 * addend.to(compute) + q_m * guided
        if addend2 is not None:
            fixed = fixed + q_2 * addend2.to(compute)
        if m3 is not None:
            fixed = fixed + q_3 * m3.to(compute)
        x = corrected.copy_(fixed).to(compute)  # as stored
    stepped = c_x * x + c_m * guided
    if addend is not None:
        stepped = stepped + c_add * addend.to(compute)
    if addend2 is not None:
        stepped = stepped + c_add2 * addend2.to(compute)
    if addend3 is not None:
        stepped = stepped + c_add3 * addend3.to(compute)
    if noise is not None:
        stepped = stepped + c_noise * noise.to(compute)
    out.copy_(stepped)
    if not next_input:
        return Stepped(out, None, converted, corrected)
    scaled = out if next_scale == 1.0 else (out.to(compute) * next_scale).to(out.dtype)
    return Stepped(out, torch.cat([scaled, scaled]), converted, corrected)
