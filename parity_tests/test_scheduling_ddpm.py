"""pare.DDPMScheduler against diffusers.DDPMScheduler: timesteps (spaced and custom), steps, loops, configs, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import DDPMScheduler as TheirDDPM
from hypothesis import event, given, settings
from hypothesis import strategies as st

import pare
from pare.parity import DTYPES, Tolerance, assert_parity
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, scheduler_setups, seeds
from parity_tests.test_scheduling_utils import (
    LOW_PRECISION,
    check_step,
    overflows_alike,
    run_loop,
    same_noise_in_float64,
    set_both,
)

# google/ddpm-cifar10-32's scheduler_config.json (pixel space: clipping on, fixed_small variance).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def their_config(config: dict) -> dict:
    """diffusers' config for the same sampler: its "fixed_large_log" takes sqrt(log beta) (NaN), so compare with "fixed_large"."""
    if config.get("variance_type") == "fixed_large_log":
        return {**config, "variance_type": "fixed_large"}
    return config


# pare's fixed_large_log sigma is exp(0.5 log beta_t), diffusers' fixed_large sqrt(beta_t): the same float32
# scalar by two paths, about 1 ulp apart, so float64 samples cannot agree to the table's 1e-10.
FIXED_LARGE_LOG = Tolerance(rel_l2=1e-6)


def step_tolerance(config):
    return FIXED_LARGE_LOG if config["variance_type"] == "fixed_large_log" else None


def make_ddpm_pair(config):
    return pare.DDPMScheduler(**config), TheirDDPM(**their_config(config))


def model_output_for(config, sample, g):
    """What a model of this variance_type outputs: (B, C, ...) or, for learned variances, (B, 2C, ...)."""
    prediction = torch.randn(sample.shape, generator=g)
    if config["variance_type"] == "learned":  # a variance: positive
        prediction = torch.cat([prediction, 0.01 * torch.rand(sample.shape, generator=g)], dim=1)
    elif config["variance_type"] == "learned_range":  # Improved DDPM's v in [-1, 1]
        prediction = torch.cat([prediction, 2 * torch.rand(sample.shape, generator=g) - 1], dim=1)
    return prediction.to(sample.device, sample.dtype)


@settings(max_examples=60)
@given(setup=scheduler_setups("ddpm"))
def test_ddpm_timesteps_equal_diffusers(setup):
    config, n = setup
    ours, theirs = make_ddpm_pair(config)
    if not set_both(ours, theirs, n, config["num_train_timesteps"]):
        return
    expected = theirs.timesteps
    if len(expected) == n + 1:  # diffusers' trailing overshoot (see test_scheduling_utils)
        assert config["timestep_spacing"] == "trailing" and expected[-1] == -1
        expected = expected[:n]
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, expected)


@settings(max_examples=60)
@given(setup=scheduler_setups("ddpm"), data=st.data(), dtype_name=scheduler_dtypes, seed=seeds,
       set_timesteps=st.booleans())
def test_ddpm_step_matches_diffusers(device, setup, data, dtype_name, seed, set_timesteps):
    config, n = setup
    dtype = DTYPES[dtype_name]
    ours, theirs = make_ddpm_pair(config)
    if set_timesteps:
        if not set_both(ours, theirs, n, config["num_train_timesteps"]):
            return
        t = ours.timesteps[data.draw(st.integers(0, n - 1), label="step index")]
    else:  # diffusers' training-chain mode: every t steps to t - 1
        event("step without set_timesteps")
        t = data.draw(st.integers(0, config["num_train_timesteps"] - 1), label="timestep")
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 3, 4, 4, generator=g).to(device, dtype)
    model_output = model_output_for(config, sample, g)
    if config["prediction_type"] == "epsilon" and ours.alphas_cumprod[t] == 0:
        with pytest.raises(ValueError, match="zero SNR"):
            ours.step(model_output, t, sample)
        event("epsilon at zero SNR: pare raises")
        return
    event(f"t {'>' if t > 0 else '=='} 0")
    out = check_step(f"DDPM t={int(t)}", ours, theirs, model_output, t, sample, seed, step_tolerance(config))
    assert out[0].dtype == dtype


@settings(max_examples=30)
@given(config=scheduler_configs("ddpm"), data=st.data(), seed=seeds)
def test_ddpm_custom_timesteps_match_diffusers(device, dtype, config, data, seed):
    T = config["num_train_timesteps"]
    chosen = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=min(T, 30), unique=True), label="timesteps")
    timesteps = sorted(chosen, reverse=True)
    ours, theirs = make_ddpm_pair(config)
    ours.set_timesteps(timesteps=timesteps, device=device)
    theirs.set_timesteps(timesteps=timesteps, device=device)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == torch.int64
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 2, 3, 3, generator=g).to(device, dtype)
    model_output = model_output_for(config, sample, g)
    for t in ours.timesteps:
        if config["prediction_type"] == "epsilon" and ours.alphas_cumprod[t] == 0:
            continue  # covered by test_ddpm_epsilon_at_zero_snr_raises
        check_step(f"DDPM custom t={int(t)}", ours, theirs, model_output, t, sample, seed, step_tolerance(config))


@settings(max_examples=25)
@given(config=scheduler_configs("ddpm", st.one_of(st.just(1000), st.integers(60, 1000))), seed=seeds)
def test_ddpm_50_step_loop_matches_diffusers(device, dtype, config, seed):
    if config["prediction_type"] == "epsilon" and config["rescale_betas_zero_snr"]:
        event("epsilon at zero SNR: v_prediction instead")
        config["prediction_type"] = "v_prediction"  # the pairing of Lin et al.; epsilon is covered by its own test
    ours, theirs = make_ddpm_pair(config)
    assert set_both(ours, theirs, 50, config["num_train_timesteps"])
    timesteps = ours.timesteps
    assert torch.equal(theirs.timesteps[:50], timesteps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    variance_type = config["variance_type"]
    a = run_loop(ours, timesteps, x, seed + 1, variance_type)
    b = run_loop(theirs, timesteps, x, seed + 1, variance_type)
    reference = None
    if dtype in LOW_PRECISION:
        with same_noise_in_float64(dtype):
            reference = run_loop(theirs, timesteps, x.double(), seed + 1, variance_type)
    if not overflows_alike("DDPM 50-step loop", a, b):
        assert_parity("DDPM 50-step loop", a, b, reference, dtype=dtype, scope="end_to_end")


def test_ddpm_fixed_large_log_is_fixed_large_where_diffusers_gives_nan():
    """sigma_t = exp(0.5 log beta_t) = sqrt(beta_t); diffusers computes sqrt(log beta_t) of a negative log."""
    ours = pare.DDPMScheduler(variance_type="fixed_large_log")
    theirs_log, theirs_large = TheirDDPM(variance_type="fixed_large_log"), TheirDDPM(variance_type="fixed_large")
    for s in (ours, theirs_log, theirs_large):
        s.set_timesteps(20)
    x, e = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert torch.isnan(theirs_log.step(e, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    check_step("DDPM fixed_large_log", ours, theirs_large, e, 500, x, seed=0)


def test_ddpm_return_dict_false_and_generator_lists():
    ours, theirs = make_ddpm_pair({"variance_type": "fixed_small"})
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    prev, x0 = ours.step(e, 500, x, generator=[torch.Generator().manual_seed(i) for i in (3, 4)], return_dict=False)
    out = theirs.step(e, 500, x, generator=[torch.Generator().manual_seed(i) for i in (3, 4)])
    assert_parity("DDPM generator list", prev, out.prev_sample)
    assert_parity("DDPM generator list x0", x0, out.pred_original_sample)


# --- configs -------------------------------------------------------------------------------------


def test_ddpm_from_config_file_matches_diffusers(tmp_path, device):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(DDPM_CIFAR10_CONFIG))
    ours = pare.DDPMScheduler.from_config(folder)
    theirs = TheirDDPM.from_pretrained(tmp_path, subfolder="scheduler")
    assert ours.config.variance_type == "fixed_small" and ours.config.timestep_spacing == "leading"
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key
    ours.set_timesteps(50, device=device), theirs.set_timesteps(50, device=device)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(1, 3, 8, 8).to(device)
    for t in ours.timesteps[[0, 25, -1]]:
        check_step(f"cifar10 DDPM t={int(t)}", ours, theirs, x.flip(-1), t, x, seed=7)


def test_ddpm_loads_a_stable_diffusion_scheduler_config(tmp_path, caplog):
    """Training scripts build DDPMScheduler from SD's PNDM/DDIM config: its other keys are ignored, with a warning."""
    from parity_tests.test_scheduling_ddim import SD21_DDIM_CONFIG

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD21_DDIM_CONFIG))
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = pare.DDPMScheduler.from_config(path)
    assert "set_alpha_to_one" in caplog.text and "skip_prk_steps" in caplog.text
    theirs = TheirDDPM.from_config(TheirDDPM.load_config(tmp_path))
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert all(theirs.config[k] == v for k, v in ours.config.items())


@settings(max_examples=20)
@given(config=scheduler_configs("ddpm"))
def test_ddpm_loads_every_config_diffusers_writes(config):
    theirs = TheirDDPM(**config)
    ours = pare.DDPMScheduler.from_config(theirs.config)
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key


def test_ddpm_unknown_variance_type_names_the_choices():
    with pytest.raises(ValueError, match=r"variance_type='fixed' is not supported; expected one of \('fixed_small', "):
        pare.DDPMScheduler(variance_type="fixed")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("timesteps, message", [
    ([10, 20], "strictly descending, but 20 follows 10"),
    ([500, 500], "strictly descending"),
    ([1000, 10], r"must lie in \[0, 999\]"),
    ([10, -1], r"must lie in \[0, 999\]"),
    ([], "empty"),
])
def test_ddpm_bad_custom_timesteps_raise(timesteps, message):
    with pytest.raises(ValueError, match=message):
        pare.DDPMScheduler().set_timesteps(timesteps=timesteps)


def test_ddpm_custom_timesteps_errors_agree_with_diffusers():
    for cls in (pare.DDPMScheduler, TheirDDPM):
        with pytest.raises(ValueError, match="descending"):
            cls().set_timesteps(timesteps=[10, 20])
        with pytest.raises(ValueError):
            cls().set_timesteps(timesteps=[1000, 10])
        with pytest.raises(ValueError):
            cls().set_timesteps(num_inference_steps=10, timesteps=[20, 10])
    with pytest.raises(ValueError, match="exactly one of num_inference_steps and timesteps"):
        pare.DDPMScheduler().set_timesteps()


def test_ddpm_bad_step_arguments_raise():
    scheduler = pare.DDPMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="timestep 501 is not one of scheduler.timesteps"):
        scheduler.step(x, 501, x)
    with pytest.raises(ValueError, match=r"timestep -1 is outside the trained range"):
        scheduler.step(x, -1, x)
    learned = pare.DDPMScheduler(variance_type="learned_range")
    learned.set_timesteps(10)
    with pytest.raises(ValueError, match="needs a model output with 2 x 3 channels .*got 3"):
        learned.step(x, 900, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 6, 2, 2\) but sample \(1, 3, 2, 2\)"):
        scheduler.step(torch.zeros(1, 6, 2, 2), 900, x)


def test_ddpm_epsilon_at_zero_snr_raises_where_diffusers_returns_inf():
    ours, theirs = make_ddpm_pair(dict(rescale_betas_zero_snr=True, clip_sample=False))
    x, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert not torch.isfinite(theirs.step(e, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    with pytest.raises(ValueError, match="v_prediction"):
        ours.step(e, 999, x)
