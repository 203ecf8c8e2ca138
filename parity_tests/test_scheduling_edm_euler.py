"""pare.EDMEulerScheduler against diffusers': the preconditioning (EDM Table 1), custom ramps, a Playground-style config.

The family-wide checks (schedules, whole loops over hypothesis configs in four dtypes with churn,
img2img, configs, errors) are in test_scheduling_sigmas.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EDMEulerScheduler as TheirEDM
from diffusers.schedulers import scheduling_edm_euler as their_module
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.schedulers.scheduling_edm_euler import EDMEulerScheduler
from parity_tests.scheduler_loops import compare_loops

# The EDM keys of Playground v2.5's scheduler config (its class there is EDMDPMSolverMultistepScheduler).
PLAYGROUND_EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="exponential",
                      num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, final_sigmas_type="zero")


@settings(max_examples=10)
@given(sigma=st.floats(1e-3, 100.0), sigma_data=st.floats(0.2, 1.0), v=st.booleans())
def test_preconditioning_equals_diffusers_and_eq_7(sigma, sigma_data, v):
    config = dict(sigma_data=sigma_data, prediction_type="v_prediction" if v else "epsilon")
    ours, theirs = EDMEulerScheduler(**config), TheirEDM(**config)
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s = torch.tensor(sigma)
    assert torch.equal(ours.precondition_inputs(x, s), theirs.precondition_inputs(x, s))
    assert torch.equal(ours.precondition_noise(s), theirs.precondition_noise(s))
    assert torch.equal(ours.precondition_noise(sigma), theirs.precondition_noise(sigma))
    denoised = ours.precondition_outputs(x, f, s)
    assert torch.equal(denoised, theirs.precondition_outputs(x, f, s))
    # Table 1: c_skip = sd^2 / (s^2 + sd^2), c_out = +-s sd / sqrt(s^2 + sd^2)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = (-1 if v else 1) * sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    assert torch.allclose(denoised.double(), c_skip * x.double() + c_out * f.double(), rtol=1e-5, atol=1e-6)


@settings(max_examples=8)
@given(ramp=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), schedule=st.sampled_from(["karras", "exponential"]),
       final=st.sampled_from(["zero", "sigma_min"]))
def test_custom_ramp_matches_diffusers(ramp, schedule, final):
    """set_timesteps(sigmas=...) takes eq. 5's ramp u in [0, 1], as diffusers' does (exponential uses only its length)."""
    ramp = sorted(ramp)
    config = dict(sigma_schedule=schedule, final_sigmas_type=final)
    ours = EDMEulerScheduler(**config)
    ours.set_timesteps(sigmas=ramp)  # a list: diffusers needs a tensor

    def make_theirs():
        scheduler = TheirEDM(**config)
        scheduler.set_timesteps(sigmas=torch.tensor(ramp))
        return scheduler

    theirs = make_theirs()
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.num_inference_steps is theirs.num_inference_steps is None
    if len(set(ours.timesteps.tolist())) == len(ramp):  # repeated ramp values give repeated timesteps: lookups differ
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * ours.init_noise_sigma
        compare_loops(f"EDM custom ramp of {len(ramp)}", ours, make_theirs, x, noise_module=their_module)


@pytest.mark.parametrize("n", [1, 4, 25])
def test_playground_style_exponential_schedule_samples_like_diffusers(n):
    ours = EDMEulerScheduler.from_config(PLAYGROUND_EDM)
    ours.set_timesteps(n)
    assert ours.init_noise_sigma == TheirEDM(**PLAYGROUND_EDM).init_noise_sigma == (80.0**2 + 1) ** 0.5

    def make_theirs():
        scheduler = TheirEDM.from_config(PLAYGROUND_EDM)
        scheduler.set_timesteps(n)
        return scheduler

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    compare_loops(f"EDM exponential, {n} steps", ours, make_theirs, x, seed=5, noise_module=their_module,
                  fields=("prev_sample", "pred_original_sample"), s_churn=2.0)


def test_pred_original_sample_override_is_used_as_in_diffusers():
    outs = []
    for cls in (EDMEulerScheduler, TheirEDM):
        scheduler = cls()
        scheduler.set_timesteps(6)
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        t = scheduler.timesteps[0]
        outs.append(scheduler.step(torch.zeros_like(x), t, x, pred_original_sample=torch.ones_like(x)))
    assert torch.equal(outs[0].prev_sample, outs[1].prev_sample)
    assert torch.equal(outs[0].pred_original_sample, torch.ones(1, 2, 4, 4))


def test_edm_errors():
    with pytest.raises(ValueError, match=r"sigma_schedule='cosine' is not supported; expected one of \('karras', 'exponential'\)"):
        EDMEulerScheduler(sigma_schedule="cosine")
    with pytest.raises(ValueError):  # diffusers checks sigma_schedule too
        TheirEDM(sigma_schedule="cosine")
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        EDMEulerScheduler(sigma_min=5.0, sigma_max=1.0)
    scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="not one number"):
        scheduler.set_timesteps(sigmas=0.5)
    x = torch.zeros(1, 1, 2, 2)
    out = scheduler.step(x, scheduler.timesteps[0], x)  # the constructor's schedule is usable, as in diffusers
    assert out.prev_sample.shape == x.shape
