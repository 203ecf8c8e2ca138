"""pare.HeunDiscreteScheduler against diffusers': the doubled timesteps, the two halves of a step, custom timesteps.

The family-wide checks (schedules, whole loops over hypothesis configs in four dtypes, img2img,
configs, errors) are in test_scheduling_sigmas.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler as TheirHeun
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from parity_tests.scheduler_loops import compare_loops

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_heun_visits_each_inner_level_twice_and_ends_with_an_euler_step():
    ours = HeunDiscreteScheduler(**SD)
    ours.set_timesteps(4)
    t, s = ours.timesteps, ours.sigmas
    assert len(t) == 2 * 4 - 1 and len(s) == 2 * 4 and ours.order == 2
    assert torch.equal(t[1::2], t[2::2]) and torch.equal(s[1:-1:2], s[2:-1:2]) and s[-1] == 0
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    halves = []
    for timestep in t:
        halves.append(ours.state_in_first_order)
        x = ours.step(torch.tanh(ours.scale_model_input(x, timestep)), timestep, x).prev_sample
    assert halves == [True, False, True, False, True, False, True]  # the last level (to sigma = 0) is Euler alone


def test_heun_correction_is_the_trapezoid_of_algorithm_1():
    """x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2, from two evaluations of the denoiser."""
    ours = HeunDiscreteScheduler(**SD)
    ours.set_timesteps(3)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    s0, s1 = ours.sigmas[0].double(), ours.sigmas[1].double()
    eps0 = torch.tanh(x)
    x_euler = ours.step(eps0, ours.timesteps[0], x).prev_sample
    eps1 = torch.tanh(x_euler)
    x_next = ours.step(eps1, ours.timesteps[1], x_euler).prev_sample
    d0 = eps0.double()  # epsilon: d = (x - (x - sigma eps)) / sigma = eps
    d1 = eps1.double()
    assert torch.allclose(x_next.double(), x.double() + (s1 - s0) * (d0 + d1) / 2, rtol=1e-5, atol=1e-5)


@settings(max_examples=8)
@given(timesteps=st.lists(st.integers(0, 999), min_size=1, max_size=30, unique=True), v=st.booleans(),
       clip=st.booleans())
def test_custom_timesteps_match_diffusers(timesteps, v, clip):
    timesteps = sorted(timesteps, reverse=True)
    config = dict(SD, prediction_type="v_prediction" if v else "epsilon", clip_sample=clip)
    ours = HeunDiscreteScheduler(**config)
    ours.set_timesteps(timesteps=timesteps)

    def make_theirs():
        scheduler = TheirHeun(**config)
        scheduler.set_timesteps(timesteps=timesteps)
        return scheduler

    theirs = make_theirs()
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    compare_loops(f"Heun, {len(timesteps)} custom timesteps", ours, make_theirs, x,
                  fields=("prev_sample", "pred_original_sample"))


def test_heun_set_timesteps_errors_match_diffusers():
    for cls in (HeunDiscreteScheduler, TheirHeun):
        scheduler = cls(use_karras_sigmas=True)
        with pytest.raises(ValueError, match="(?i)one of `num_inference_steps`"):
            scheduler.set_timesteps()
        with pytest.raises(ValueError, match="(?i)only one of `num_inference_steps`|can only pass one"):
            scheduler.set_timesteps(5, timesteps=[900, 100])
        with pytest.raises(ValueError, match="use_karras_sigmas"):
            scheduler.set_timesteps(timesteps=[900, 100])
    with pytest.raises(ValueError, match="strictly descending"):
        HeunDiscreteScheduler().set_timesteps(timesteps=[100, 900])


def test_heun_exp_beta_schedule_equals_diffusers():
    ours, theirs = HeunDiscreteScheduler(beta_schedule="exp"), TheirHeun(beta_schedule="exp")
    assert torch.equal(ours.betas, theirs.betas)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
