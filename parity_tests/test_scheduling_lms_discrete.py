"""pare.LMSDiscreteScheduler's integrated coefficients: exact (scipy-free) integrals against scipy.integrate.quad and diffusers.

diffusers integrates each Lagrange basis polynomial with scipy.integrate.quad, evaluating the integrand
with float32 sigmas (0-dim tensors); pare integrates the same polynomial exactly (Gauss-Legendre in
float64). Against quad run in float64 on the same nodes, pare agrees to ~1e-14 of the step; against
diffusers' float32 integrand, to ~1.5e-6 of the step, which is why the float64 loops are compared at
1e-6 here rather than at the table's 1e-10. The family-wide checks are in test_scheduling_sigmas.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler as TheirLMS
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from pare.parity import Tolerance, assert_parity
from pare.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler, lms_coefficient
from parity_tests.test_scheduling_sigmas import assert_same_schedule, sigma_configs
from parity_tests.test_scheduling_utils import dummy_model


def quad_float64(sigmas: np.ndarray, order: int, t: int, j: int) -> float:
    """diffusers' get_lms_coefficient, with float64 nodes instead of float32 ones and a tight tolerance."""
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[t - k]) / (sigmas[t - j] - sigmas[t - k])
        return prod
    return integrate.quad(basis, sigmas[t], sigmas[t + 1], epsabs=1e-300, epsrel=1e-13)[0]


def all_coefficients(n: int):
    for t in range(n):
        for order in range(1, min(t + 1, 4) + 1):
            for j in range(order):
                yield t, order, j


@settings(max_examples=6)
@given(config=sigma_configs("lms"), n=st.integers(1, 100), data=st.data())
def test_lms_coefficients_are_exact_integrals_and_match_diffusers_to_float32_rounding(config, n, data):
    n = min(n, config["num_train_timesteps"])
    theirs = TheirLMS(**config)
    theirs.set_timesteps(n)
    ours = LMSDiscreteScheduler(**config)
    ours.set_timesteps(n)
    assert_same_schedule(ours, theirs)
    sigmas = ours.sigmas.double().numpy()
    # diffusers' quad runs torch ops per evaluation (slow): check it at a dozen steps, pare's exactness at all
    checked = set(data.draw(st.lists(st.integers(0, n - 1), max_size=12), label="steps checked against diffusers"))
    for t, order, j in all_coefficients(n):
        step = abs(sigmas[t + 1] - sigmas[t])
        exact = lms_coefficient(ours.sigmas, order, t, j)
        assert ours.get_lms_coefficient(order, t, j) == exact
        assert abs(exact - quad_float64(sigmas, order, t, j)) <= 1e-12 * step, (t, order, j)
        if t in checked and theirs.sigmas[t + 1] == ours.sigmas[t + 1]:
            # float32 rounding of diffusers' integrand, amplified by the basis' conditioning (nodes close to each other)
            nodes = sigmas[t - order + 1:t + 1]
            conditioning = 1 + (max(abs(nodes).max(), sigmas[t + 1]) / np.abs(np.diff(nodes)).min() if order > 1 else 0)
            assert abs(exact - theirs.get_lms_coefficient(order, t, j)) <= 1e-6 * step * conditioning, (t, order, j)
    for t in range(3, n):  # the Lagrange basis is a partition of unity: the coefficients sum to the step
        assert sum(lms_coefficient(ours.sigmas, 4, t, j) for j in range(4)) == pytest.approx(sigmas[t + 1] - sigmas[t], rel=1e-12)


@pytest.mark.parametrize("n", [1, 7, 50])
def test_lms_float64_loop_matches_diffusers_to_its_quad_rounding(n):
    """In float64 the only difference left is diffusers' float32 integrand: the loops agree to 1e-6, step by step."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    samples = []
    for cls in (LMSDiscreteScheduler, TheirLMS):
        scheduler = cls(**config)
        scheduler.set_timesteps(n)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double() * scheduler.init_noise_sigma
        trajectory = []
        for t in scheduler.timesteps:
            x = scheduler.step(dummy_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
            trajectory.append(x)
        samples.append(trajectory)
    for i, (a, b) in enumerate(zip(*samples)):
        assert a.dtype == torch.float64
        assert_parity(f"LMS float64, step {i} of {n}", a, b, tolerance=Tolerance(rel_l2=1e-6))


def test_lms_order_argument_is_checked():
    scheduler = LMSDiscreteScheduler()
    scheduler.set_timesteps(5)
    x = torch.zeros(1, 1, 2, 2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            scheduler.step(x, scheduler.timesteps[0], x, order=bad)


def test_lms_needs_no_scipy():
    import sys
    from unittest import mock

    with mock.patch.dict(sys.modules, {"scipy": None, "scipy.integrate": None}):
        scheduler = LMSDiscreteScheduler(use_karras_sigmas=True)
        scheduler.set_timesteps(6)
        x = torch.ones(1, 1, 2, 2)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x).prev_sample
    assert torch.isfinite(x).all()
