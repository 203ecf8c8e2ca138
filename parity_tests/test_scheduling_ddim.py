"""pare.DDIMScheduler against diffusers.DDIMScheduler: timesteps, single steps, full loops, configs, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import DDIMScheduler as TheirDDIM
from hypothesis import event, given, settings
from hypothesis import strategies as st

import pare
from pare.parity import DTYPES, assert_parity
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, scheduler_setups, seeds
from parity_tests.test_scheduling_utils import (
    LOW_PRECISION,
    check_step,
    diffusers_prev_sample,
    make_pair,
    overflows_alike,
    run_loop,
    same_noise_in_float64,
    set_both,
)

# Stable Diffusion 2.1's scheduler/scheduler_config.json, as the Hub serves it, plus one key nobody knows.
SD21_DDIM_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "a_key_no_library_knows": 42,
}

etas = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@settings(max_examples=60)
@given(setup=scheduler_setups("ddim"))
def test_ddim_timesteps_equal_diffusers(setup):
    config, n = setup
    ours, theirs = make_pair("ddim", config)
    if not set_both(ours, theirs, n, config["num_train_timesteps"]):
        return
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    expected = theirs.timesteps
    if len(expected) == n + 1:  # diffusers' trailing overshoot (see test_scheduling_utils)
        assert config["timestep_spacing"] == "trailing" and expected[-1] == -1
        event("diffusers' trailing overshoot")
        expected = expected[:n]
    assert torch.equal(ours.timesteps, expected)
    assert ours.num_inference_steps == theirs.num_inference_steps == n


@settings(max_examples=60)
@given(setup=scheduler_setups("ddim"), data=st.data(), dtype_name=scheduler_dtypes, eta=etas, seed=seeds,
       clipped=st.booleans(), given_noise=st.booleans())
def test_ddim_step_matches_diffusers(device, setup, data, dtype_name, eta, seed, clipped, given_noise):
    config, n = setup
    dtype = DTYPES[dtype_name]
    ours, theirs = make_pair("ddim", config)
    if not set_both(ours, theirs, n, config["num_train_timesteps"]):
        return
    t = ours.timesteps[data.draw(st.integers(0, n - 1), label="step index")]
    g = torch.Generator().manual_seed(seed)
    sample, model_output, noise = (torch.randn(2, 3, 4, 4, generator=g).to(device, dtype) for _ in range(3))
    kwargs = dict(eta=eta, use_clipped_model_output=clipped)
    if given_noise:
        kwargs["variance_noise"] = noise
    if config["prediction_type"] == "epsilon" and ours.alphas_cumprod[t] == 0:
        with pytest.raises(ValueError, match="zero SNR"):
            ours.step(model_output, t, sample, **kwargs)
        event("epsilon at zero SNR: pare raises")
        return
    if eta > 0 and ours.alphas_cumprod[t] == 0:
        generator = None if given_noise else seed
        if not torch.isfinite(diffusers_prev_sample(theirs, model_output, t, sample, generator, kwargs)).all():
            # diffusers issue #5969: sqrt of a rounding error below 0 at zero SNR; pare clamps it to 0.
            ours_prev = diffusers_prev_sample(ours, model_output, t, sample, generator, kwargs)
            assert torch.isfinite(ours_prev).all()
            event("diffusers #5969 NaN")
            return
    out = check_step(f"DDIM t={int(t)}", ours, theirs, model_output, t, sample, None if given_noise else seed, **kwargs)
    assert out[0].dtype == dtype


@settings(max_examples=25)
@given(config=scheduler_configs("ddim", st.one_of(st.just(1000), st.integers(60, 1000))), eta=etas, seed=seeds)
def test_ddim_50_step_loop_matches_diffusers(device, dtype, config, eta, seed):
    ours, theirs = make_pair("ddim", config)
    assert set_both(ours, theirs, 50, config["num_train_timesteps"])
    if config["prediction_type"] == "epsilon" and ours.alphas_cumprod[ours.timesteps[0]] == 0:
        # epsilon cannot start at zero SNR (test_epsilon_at_zero_snr_raises...); the paper's pairing instead
        event("epsilon at zero SNR: v_prediction instead")
        config["prediction_type"] = "v_prediction"
        ours, theirs = make_pair("ddim", config)
        set_both(ours, theirs, 50, config["num_train_timesteps"])
    timesteps = ours.timesteps
    assert torch.equal(theirs.timesteps[:50], timesteps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    a = run_loop(ours, timesteps, x, seed + 1, eta=eta)
    b = run_loop(theirs, timesteps, x, seed + 1, eta=eta)
    if not torch.isfinite(b).all() and eta > 0 and ours.alphas_cumprod[timesteps[0]] == 0:
        assert torch.isfinite(a).all()  # diffusers issue #5969 (NaN at zero SNR with eta > 0); pare clamps
        event("diffusers #5969 NaN")
        return
    reference = None
    if dtype in LOW_PRECISION:
        with same_noise_in_float64(dtype):
            reference = run_loop(theirs, timesteps, x.double(), seed + 1, eta=eta)
    if not overflows_alike("DDIM 50-step loop", a, b):
        assert_parity("DDIM 50-step loop", a, b, reference, dtype=dtype, scope="end_to_end")


def test_ddim_generator_lists_draw_per_batch_element():
    ours, theirs = make_pair("ddim", {})
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x, e = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    a = ours.step(e, 500, x, eta=1.0, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    b = theirs.step(e, 500, x, eta=1.0, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert_parity("DDIM generator list", a.prev_sample, b.prev_sample, tolerance=None)
    c = ours.step(e, 500, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a.prev_sample, c.prev_sample)  # the list really is used


def test_ddim_return_dict_false_gives_the_same_tuple():
    ours = pare.DDIMScheduler()
    ours.set_timesteps(20)
    x, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    out = ours.step(e, 951, x)
    assert isinstance(ours.step(e, 951, x, return_dict=False), tuple)
    prev, x0 = ours.step(e, 951, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


# --- configs -------------------------------------------------------------------------------------


def write_pipeline_scheduler(root, config):
    folder = root / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("where", ["file", "folder"])
def test_ddim_from_sd21_scheduler_config_matches_diffusers(tmp_path, caplog, where):
    folder = write_pipeline_scheduler(tmp_path, SD21_DDIM_CONFIG)
    path = folder / "scheduler_config.json" if where == "file" else folder
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = pare.DDIMScheduler.from_config(path)
    assert "a_key_no_library_knows" in caplog.text and "skip_prk_steps" in caplog.text  # ignored, with a warning
    theirs = TheirDDIM.from_pretrained(tmp_path, subfolder="scheduler")

    assert ours.config.prediction_type == "v_prediction" and ours.config.steps_offset == 1
    assert ours.config.set_alpha_to_one is False and ours.config.timestep_spacing == "leading"  # a default
    assert "_class_name" not in ours.config and "a_key_no_library_knows" not in ours.config
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.final_alpha_cumprod == theirs.final_alpha_cumprod == ours.alphas_cumprod[0]

    ours.set_timesteps(50), theirs.set_timesteps(50)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps[0] == 981  # leading + steps_offset
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in ours.timesteps[[0, 25, -1]]:
        check_step(f"SD2.1 DDIM t={int(t)}", ours, theirs, v, t, x, seed=None)


def test_ddim_config_round_trips_through_both_libraries(tmp_path):
    ours = pare.DDIMScheduler.from_config(SD21_DDIM_CONFIG, timestep_spacing="trailing", rescale_betas_zero_snr=True)
    path = ours.save_config(tmp_path)
    assert json.loads(path.read_text())["_class_name"] == "DDIMScheduler"
    theirs = TheirDDIM.from_pretrained(tmp_path)
    again = pare.DDIMScheduler.from_config(dict(theirs.config))  # diffusers' FrozenDict, with its private keys
    assert dict(again.config) == dict(ours.config)
    assert all(theirs.config[k] == v for k, v in ours.config.items())


@settings(max_examples=20)
@given(config=scheduler_configs("ddim"))
def test_ddim_loads_every_config_diffusers_writes(config):
    theirs = TheirDDIM(**config)
    ours = pare.DDIMScheduler.from_config(theirs.config)
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key


def test_ddim_rejects_ddpm_only_beta_schedules():
    with pytest.raises(ValueError, match=r"beta_schedule='sigmoid' .* \('linear', 'scaled_linear', 'squaredcos_cap_v2'\)"):
        pare.DDIMScheduler(beta_schedule="sigmoid")


# --- bad input -----------------------------------------------------------------------------------


def test_ddim_step_before_set_timesteps_raises():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        pare.DDIMScheduler().step(x, 999, x)
    with pytest.raises(ValueError, match="set_timesteps"):  # diffusers, too
        TheirDDIM().step(x, 999, x)


def test_ddim_generator_and_variance_noise_together_raise():
    x = torch.zeros(1, 1, 2, 2)
    for cls in (pare.DDIMScheduler, TheirDDIM):
        scheduler = cls()
        scheduler.set_timesteps(10)
        with pytest.raises(ValueError, match="(?i)generator .*variance_noise"):
            scheduler.step(x, 900, x, eta=0.5, generator=torch.Generator(), variance_noise=x)


def test_ddim_bad_step_arguments_raise():
    scheduler = pare.DDIMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta=-0.5 is negative"):
        scheduler.step(x, 900, x, eta=-0.5)
    with pytest.raises(ValueError, match=r"timestep 1000 is outside the trained range \[0, 999\]"):
        scheduler.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 2, 2\) but sample \(1, 1, 2, 2\)"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 900, x)


def test_eta_one_at_zero_snr_stays_finite_where_diffusers_gives_nan():
    """diffusers issue #5969. At alpha_t = 0, eta = 1: sigma_t^2 = 1 - alpha_{t-1}, so x_{t-1} = sqrt(alpha_{t-1}) x_0 + sigma_t z.

    Whether diffusers' 1 - alpha_{t-1} - sigma_t^2 rounds below zero depends on the step count (and
    on torch's rounding of 0-dim pow), so every count up to 100 is tried with SD's betas.
    """
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ours, theirs = make_pair("ddim", config)
    x, v, z = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    nan_counts = []
    for n in range(1, 101):
        ours.set_timesteps(n), theirs.set_timesteps(n)
        if not torch.isnan(theirs.step(v, 999, x, eta=1.0, variance_noise=z).prev_sample).any():
            continue
        nan_counts.append(n)
        out = ours.step(v, 999, x, eta=1.0, variance_noise=z)
        alpha_prev = ours.alphas_cumprod[ours.previous_timestep(999)]
        expected = alpha_prev**0.5 * out.pred_original_sample + (1 - alpha_prev) ** 0.5 * z
        assert_parity(f"DDIM zero-SNR eta=1 step, {n} steps", out.prev_sample, expected)
    assert nan_counts, "diffusers no longer gives NaN here (#5969 fixed?): compare with it instead"


def test_epsilon_at_zero_snr_raises_where_diffusers_returns_inf():
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ours, theirs = make_pair("ddim", config)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert not torch.isfinite(theirs.step(e, 999, x).pred_original_sample).all()
    with pytest.raises(ValueError, match="v_prediction"):
        ours.step(e, 999, x)


def test_a_timestep_taken_from_the_schedule_is_read_from_its_host_copy():
    """A pipeline's loop passes elements of `scheduler.timesteps` (on the GPU, reading each would wait for it):
    their values come from one host copy of the schedule, the right element each time, slices included."""
    ours = pare.DDIMScheduler()
    ours.set_timesteps(10)
    ts = ours.timesteps
    assert [ours._host_int(t) for t in ts] == ts.tolist()
    assert [ours._host_int(t) for t in ts[3:]] == ts[3:].tolist()  # img2img's loop starts part-way in
    host = ours._host_timesteps
    assert ours._host_int(ts[4]) == int(ts[4]) and ours._host_timesteps is host  # not read again
    ts[4] = 7  # an in-place change is seen (version counter)
    assert ours._host_int(ts[4]) == 7
    ours.set_timesteps(5)  # a new schedule is read anew
    assert [ours._host_int(t) for t in ours.timesteps] == ours.timesteps.tolist()
    assert ours._host_int(torch.tensor(981)) == 981 and ours._host_int(500) == 500  # anything else: int()
