"""pare.EulerDiscreteScheduler against diffusers': custom timesteps and sigmas, churn, continuous timesteps, SDXL's config.

The family-wide checks (schedules, whole loops over hypothesis configs in four dtypes, img2img,
configs, errors) are in test_scheduling_sigmas.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler as TheirEuler
from diffusers.schedulers import scheduling_euler_discrete as their_module
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from parity_tests.scheduler_loops import compare_loops

# Stable Diffusion XL base 1.0's scheduler/scheduler_config.json, as the Hub serves it.
SDXL_EULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def their_euler(config, **set_timesteps):
    def make():
        scheduler = TheirEuler.from_config(config)
        scheduler.set_timesteps(**set_timesteps)
        return scheduler
    return make


def latents(scheduler, seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma


def test_sdxl_config_loads_and_samples_like_diffusers(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(__import__("json").dumps(SDXL_EULER_CONFIG))
    ours = EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    theirs = TheirEuler.from_pretrained(tmp_path, subfolder="scheduler")
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    ours.set_timesteps(30)
    assert torch.equal(ours.init_noise_sigma, their_euler(theirs.config, num_inference_steps=30)().init_noise_sigma)
    compare_loops("SDXL Euler, 30 steps", ours, their_euler(theirs.config, num_inference_steps=30), latents(ours),
                  fields=("prev_sample", "pred_original_sample"))


@settings(max_examples=10)
@given(n=st.integers(1, 60), karras=st.booleans(), seed=st.integers(0, 100), continuous=st.booleans())
def test_custom_sigmas_match_diffusers(n, karras, seed, continuous):
    """set_timesteps(sigmas=...): the timesteps follow by log-sigma interpolation; the last sigma is where sampling ends."""
    config = dict(SD, use_karras_sigmas=karras, prediction_type="v_prediction" if continuous else "epsilon",
                  timestep_type="continuous" if continuous else "discrete")
    g = torch.Generator().manual_seed(seed)
    sigmas = sorted((torch.rand(n, generator=g) * 14 + 0.03).tolist(), reverse=True) + [0.0]
    ours = EulerDiscreteScheduler(**config)
    ours.set_timesteps(sigmas=sigmas)
    theirs = their_euler(config, sigmas=sigmas)()
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.num_inference_steps == theirs.num_inference_steps == n
    compare_loops(f"Euler, {n} custom sigmas", ours, their_euler(config, sigmas=sigmas), latents(ours),
                  fields=("prev_sample", "pred_original_sample"))


@settings(max_examples=10)
@given(timesteps=st.lists(st.floats(0, 999, width=32), min_size=1, max_size=40, unique=True),
       interpolation=st.sampled_from(["linear", "log_linear"]), final=st.sampled_from(["zero", "sigma_min"]))
def test_custom_timesteps_match_diffusers(timesteps, interpolation, final):
    timesteps = sorted(timesteps, reverse=True)
    config = dict(SD, interpolation_type=interpolation, final_sigmas_type=final)
    ours = EulerDiscreteScheduler(**config)
    ours.set_timesteps(timesteps=timesteps)
    theirs = their_euler(config, timesteps=timesteps)()
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    compare_loops(f"Euler, {len(timesteps)} custom timesteps", ours, their_euler(config, timesteps=timesteps), latents(ours))


@pytest.mark.parametrize("s_tmin,s_tmax", [(0.0, float("inf")), (1.0, 8.0)])
def test_churn_draws_diffusers_noise_and_stays_bit_identical(s_tmin, s_tmax):
    """Karras Algorithm 2's churn: the same generator seed gives the same noise and the same samples, bit for bit."""
    outs = []
    for cls in (EulerDiscreteScheduler, TheirEuler):
        scheduler = cls(**SD, use_karras_sigmas=True)
        scheduler.set_timesteps(25)
        x, g = latents(scheduler), torch.Generator().manual_seed(3)
        for t in scheduler.timesteps:
            out = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x, s_churn=40.0, s_tmin=s_tmin,
                                 s_tmax=s_tmax, s_noise=1.003, generator=g)
            x = out.prev_sample
        outs.append((x, out.pred_original_sample))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_continuous_v_prediction_timesteps_are_log_sigma_over_4():
    config = dict(SD, prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True)
    ours, theirs = EulerDiscreteScheduler(**config), TheirEuler(**config)
    assert torch.equal(ours.timesteps, theirs.timesteps)  # the constructor's, for all 1000 training sigmas
    ours.set_timesteps(12), theirs.set_timesteps(12)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.allclose(ours.timesteps, 0.25 * ours.sigmas[:-1].log())


def test_a_repeated_first_timestep_starts_at_the_first_level_where_diffusers_fails():
    """sigma_max above the largest trained sigma: the first levels all map to t = 999. diffusers' lookup takes the second
    match, skips a level and runs off the end of sigmas; pare starts at 0, as diffusers does after set_begin_index(0)."""
    config = dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=40.0)
    ours = EulerDiscreteScheduler(**config)
    ours.set_timesteps(8)
    assert ours.timesteps[0] == ours.timesteps[1] == 999
    theirs = their_euler(config, num_inference_steps=8)()
    with pytest.raises(IndexError):
        x = latents(theirs)
        for t in theirs.timesteps:
            x = theirs.step(torch.tanh(theirs.scale_model_input(x, t)), t, x).prev_sample

    def theirs_from_zero():
        scheduler = their_euler(config, num_inference_steps=8)()
        scheduler.set_begin_index(0)
        return scheduler

    compare_loops("Euler, repeated first timestep", ours, theirs_from_zero, latents(ours), seed=None, noise_module=their_module)


def test_set_timesteps_errors_match_diffusers():
    for cls in (EulerDiscreteScheduler, TheirEuler):
        scheduler = cls(use_karras_sigmas=True)
        with pytest.raises(ValueError, match="(?i)only one of `timesteps` or `sigmas`"):
            scheduler.set_timesteps(timesteps=[900, 500], sigmas=[3.0, 0.0])
        with pytest.raises(ValueError, match="(?i)one of `num_inference_steps`"):
            scheduler.set_timesteps()
        with pytest.raises(ValueError, match="use_karras_sigmas"):
            scheduler.set_timesteps(timesteps=[900, 500])
    ours = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="strictly descending"):
        ours.set_timesteps(timesteps=[500, 900])
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        ours.set_timesteps(timesteps=[1200, 500])
    with pytest.raises(ValueError, match="only the last of sigmas may be 0"):
        ours.set_timesteps(sigmas=[3.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="must not increase"):
        ours.set_timesteps(sigmas=[1.0, 3.0, 0.0])


def test_original_sample_is_an_alias_of_sample_as_in_diffusers():
    for prediction_type in ("sample", "original_sample"):
        ours, theirs = EulerDiscreteScheduler(prediction_type=prediction_type), TheirEuler(prediction_type=prediction_type)
        ours.set_timesteps(5), theirs.set_timesteps(5)
        compare_loops(f"Euler {prediction_type}", ours, lambda: their_euler(dict(prediction_type=prediction_type),
                      num_inference_steps=5)(), latents(ours), fields=("prev_sample", "pred_original_sample"))
