"""pare.EulerAncestralDiscreteScheduler against diffusers': SDXL-Turbo's config, get_ancestral_step, rescaled zero SNR.

The family-wide checks (schedules, whole loops over hypothesis configs in four dtypes, seeds and
generator lists, img2img, configs, errors) are in test_scheduling_sigmas.py.
"""

from __future__ import annotations

import json

import torch
from diffusers import EulerAncestralDiscreteScheduler as TheirEulerA
from diffusers.schedulers import scheduling_euler_ancestral_discrete as their_module
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler, get_ancestral_step
from parity_tests.scheduler_loops import compare_loops

# SDXL-Turbo's scheduler/scheduler_config.json, as the Hub serves it.
SDXL_TURBO_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
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
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def test_sdxl_turbo_config_samples_like_diffusers_with_one_seed(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SDXL_TURBO_CONFIG))
    ours = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    for n in (1, 4):  # Turbo's step counts
        ours.set_timesteps(n)

        def make_theirs():
            scheduler = TheirEulerA.from_pretrained(tmp_path)
            scheduler.set_timesteps(n)
            return scheduler

        assert torch.equal(ours.timesteps, make_theirs().timesteps) and ours.timesteps[0] == 999
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
        compare_loops(f"SDXL-Turbo Euler a, {n} steps", ours, make_theirs, x, seed=42, noise_module=their_module,
                      fields=("prev_sample", "pred_original_sample"))


@settings(max_examples=20)
@given(sigma_from=st.floats(0.01, 100.0), ratio=st.floats(0.0, 1.0))
def test_get_ancestral_step_splits_the_variance(sigma_from, ratio):
    sigma_from = torch.tensor(sigma_from, dtype=torch.float64)
    sigma_to = sigma_from * ratio
    down, up = get_ancestral_step(sigma_from, sigma_to)
    assert torch.allclose(down**2 + up**2, sigma_to**2, rtol=1e-9, atol=1e-300)
    # diffusers' sqrt(sigma_to^2 - sigma_up^2) is the exact sigma_to^2 / sigma_from up to cancellation, which costs
    # precision relative to sigma_to (not to sigma_down itself) when sigma_down << sigma_to
    assert abs(float(down - sigma_to**2 / sigma_from)) <= 1e-6 * float(sigma_to)
    assert bool(down <= sigma_to + 1e-12) and bool(down >= 0)


def test_rescaled_zero_snr_v_prediction_matches_diffusers():
    config = dict(SDXL_TURBO_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ours = EulerAncestralDiscreteScheduler.from_config(config)
    ours.set_timesteps(10)
    assert abs(float(ours.sigmas[0]) - 4096.0) < 1e-3  # alpha_bar_{T-1} = 2^-24 instead of 0, as in diffusers

    def make_theirs():
        scheduler = TheirEulerA.from_config(config)
        scheduler.set_timesteps(10)
        return scheduler

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    compare_loops("Euler a, zero SNR", ours, make_theirs, x, seed=1, noise_module=their_module)
