"""pare.LCMScheduler against diffusers.LCMScheduler: timesteps, strength, noise, whole loops, img2img, configs, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import LCMScheduler as TheirLCM
from diffusers.schedulers import scheduling_lcm as their_lcm_module
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, assert_parity
from pare.schedulers.scheduling_lcm import LCMScheduler
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, seeds
from parity_tests.test_scheduling_pndm import SD15_PNDM_CONFIG
from parity_tests.test_scheduling_utils import STEP_FP32

LCM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
            "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding",
            "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr")
strengths = st.one_of(st.just(1.0), st.floats(0.05, 1.0))


@st.composite
def lcm_configs(draw, num_train_timesteps=st.one_of(st.just(1000), st.integers(100, 1000))):
    """DDIM's config strategy (every shared option) cut to LCM's keys, plus LCM's own two."""
    ddim = draw(scheduler_configs("ddim", num_train_timesteps))
    config = {key: ddim[key] for key in LCM_KEYS}
    config["original_inference_steps"] = draw(st.one_of(st.just(50), st.integers(1, 100)))
    config["timestep_scaling"] = draw(st.one_of(st.just(10.0), st.floats(0.5, 20.0)))
    return config


def set_both(ours, theirs, **kwargs) -> bool:
    """set_timesteps(**kwargs) on both: True with equal timesteps, False where both refuse."""
    try:
        theirs.set_timesteps(**kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            ours.set_timesteps(**kwargs)
        event("diffusers and pare refuse")
        return False
    try:
        ours.set_timesteps(**kwargs)
    except ValueError as e:  # strength cut custom timesteps to none: diffusers returns an empty schedule
        assert "keeps none" in str(e) and len(theirs.timesteps) == 0, str(e)
        event("no timesteps left: pare refuses")
        return False
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == theirs.num_inference_steps
    return True


@settings(max_examples=60)
@given(config=lcm_configs(), n=st.integers(1, 100), strength=strengths, original=st.none() | st.integers(1, 100))
def test_lcm_timesteps_equal_diffusers(config, n, strength, original):
    ours, theirs = LCMScheduler(**config), TheirLCM(**config)
    set_both(ours, theirs, num_inference_steps=n, strength=strength, original_inference_steps=original)


@settings(max_examples=40)
@given(config=lcm_configs(), n=st.one_of(st.integers(1, 100), st.sampled_from([1, 2, 3, 4, 8])), strength=strengths,
       dtype_name=scheduler_dtypes, seed=seeds)
def test_lcm_loop_matches_diffusers_step_by_step(device, config, n, strength, dtype_name, seed):
    """prev_sample and denoised at every step; the same generator seed draws the same noise in both."""
    config["original_inference_steps"] = max(config["original_inference_steps"], n)  # n <= N, else both refuse
    if config["prediction_type"] == "epsilon" and config["rescale_betas_zero_snr"]:
        config["prediction_type"] = "v_prediction"  # epsilon at zero SNR: pare raises (test_lcm_bad_calls_raise)
    ours = LCMScheduler(**config)
    if not set_both(ours, TheirLCM(**config), num_inference_steps=n, strength=strength):
        return

    def make_theirs():
        theirs = TheirLCM(**config)
        theirs.set_timesteps(num_inference_steps=n, strength=strength)
        return theirs

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    compare_loops(f"LCM {n} steps", ours, make_theirs, x, seed=seed + 1, noise_module=their_lcm_module,
                  fields=("prev_sample", "denoised"))
    assert ours.step_index == len(ours.timesteps)


@settings(max_examples=20)
@given(config=lcm_configs(st.just(1000)), data=st.data(), strength=strengths, seed=seeds)
def test_lcm_custom_timesteps_match_diffusers(config, data, strength, seed):
    """Custom timesteps, cut by strength; the last step adds noise in both (diffusers keeps the full count: see the class doc)."""
    config["prediction_type"] = "v_prediction" if config["rescale_betas_zero_snr"] else config["prediction_type"]
    timesteps = sorted(data.draw(st.sets(st.integers(0, 999), min_size=1, max_size=12)), reverse=True)
    ours = LCMScheduler(**config)
    if not set_both(ours, TheirLCM(**config), timesteps=timesteps, strength=strength):
        return

    def make_theirs():
        theirs = TheirLCM(**config)
        theirs.set_timesteps(timesteps=timesteps, strength=strength)
        return theirs

    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    compare_loops("LCM custom timesteps", ours, make_theirs, x, seed=seed, noise_module=their_lcm_module,
                  fields=("prev_sample", "denoised"))


def test_lcm_noise_depends_on_the_seed_only():
    def run(scheduler, seed):
        scheduler.set_timesteps(4)
        x = torch.ones(1, 2, 3, 3)
        g = torch.Generator().manual_seed(seed)
        return [scheduler.step(0.1 * x, t, x, generator=g).prev_sample for t in scheduler.timesteps[:2]][-1]

    assert torch.equal(run(LCMScheduler(), 7), run(TheirLCM(), 7))
    assert not torch.allclose(run(LCMScheduler(), 7), run(LCMScheduler(), 8))
    ours, theirs = LCMScheduler(), TheirLCM()
    ours.set_timesteps(4), theirs.set_timesteps(4)
    x = torch.randn(3, 2, 3, 3)
    a = ours.step(x, 999, x, generator=[torch.Generator().manual_seed(i) for i in range(3)]).prev_sample
    b = theirs.step(x, 999, x, generator=[torch.Generator().manual_seed(i) for i in range(3)]).prev_sample
    assert_parity("LCM generator list", a, b, tolerance=STEP_FP32)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_lcm_img2img_start_matches_diffusers(strength):
    """strength cuts the schedule; add_noise makes the start latents; set_begin_index starts part-way."""
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, theirs = LCMScheduler(), TheirLCM()
    ours.set_timesteps(4, strength=strength), theirs.set_timesteps(4, strength=strength)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    start = ours.timesteps[:1].repeat(2)
    latents = ours.add_noise(x0, noise, start)
    assert_parity("LCM img2img add_noise", latents, theirs.add_noise(x0, noise, start), tolerance=STEP_FP32)
    compare_loops(f"LCM img2img strength={strength}", ours, lambda: theirs, latents, seed=0,
                  noise_module=their_lcm_module, fields=("prev_sample", "denoised"))

    # set_begin_index: the full schedule, entered at index 2 (what an img2img pipeline does for order-1 schedulers)
    ours, theirs = LCMScheduler(), TheirLCM()
    ours.set_timesteps(6), theirs.set_timesteps(6)
    ours.set_begin_index(2), theirs.set_begin_index(2)
    assert ours.begin_index == theirs.begin_index == 2 and ours.step_index is None
    latents = ours.add_noise(x0, noise, ours.timesteps[2:3])
    compare_loops("LCM from begin_index 2", ours, lambda: theirs, latents, timesteps=ours.timesteps[2:], seed=1,
                  noise_module=their_lcm_module, fields=("prev_sample", "denoised"))
    assert ours.step_index == theirs.step_index == 6


def test_lcm_boundary_condition_matches_diffusers():
    ours, theirs = LCMScheduler(timestep_scaling=3.0), TheirLCM(timestep_scaling=3.0)
    for t in (0, 1, 259, torch.tensor(999), torch.tensor(19)):
        a, b = ours.get_scalings_for_boundary_condition_discrete(t), theirs.get_scalings_for_boundary_condition_discrete(t)
        assert [float(v) for v in a] == [float(v) for v in b]
    c_skip, c_out = ours.get_scalings_for_boundary_condition_discrete(0)
    assert (c_skip, c_out) == (1.0, 0.0)  # f(x, 0) = x


def test_lcm_loads_a_pndm_folder_config_as_diffusers(caplog):
    """LCM-LoRA's recipe: LCMScheduler.from_config(pipe.scheduler.config) of an SD1.5 folder."""
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = LCMScheduler.from_config(SD15_PNDM_CONFIG)
    assert "skip_prk_steps" in caplog.text
    theirs = TheirLCM.from_config(SD15_PNDM_CONFIG)
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    ours.set_timesteps(4), theirs.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    compare_loops("LCM from an SD1.5 config", ours, lambda: theirs, x, seed=0, noise_module=their_lcm_module,
                  fields=("prev_sample", "denoised"))


@pytest.mark.parametrize("key, value", [("prediction_type", "flow"), ("beta_schedule", "sigmoid"),
                                        ("timestep_spacing", "karras")])
def test_lcm_refuses_unknown_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"LCMScheduler: {key}='{value}' is not supported; expected one of \("):
        LCMScheduler.from_config({"_class_name": "LCMScheduler", key: value})


def test_lcm_config_round_trips_through_diffusers(tmp_path):
    ours = LCMScheduler(original_inference_steps=25, timestep_scaling=5.0, rescale_betas_zero_snr=True)
    theirs = TheirLCM.from_pretrained(ours.save_config(tmp_path).parent)
    assert dict(LCMScheduler.from_config(dict(theirs.config)).config) == dict(ours.config)
    again = LCMScheduler.from_pretrained(tmp_path)
    assert dict(again.config) == dict(ours.config)


def test_lcm_constants_match_diffusers():
    ours, theirs = LCMScheduler(), TheirLCM()
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.step_index is None and ours.begin_index is None
    ours.set_timesteps(4), theirs.set_timesteps(4)
    assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == [int(theirs.previous_timestep(t)) for t in theirs.timesteps]


def test_lcm_bad_calls_raise():
    x = torch.zeros(1, 1, 2, 2)
    scheduler = LCMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="needs one of"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="only one of"):
        scheduler.set_timesteps(4, timesteps=[999, 499])
    with pytest.raises(ValueError, match=r"strength=0 must lie in \(0, 1\]"):
        scheduler.set_timesteps(4, strength=0)
    with pytest.raises(ValueError, match="fewer than num_inference_steps=8"):
        scheduler.set_timesteps(8, strength=0.1)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        scheduler.set_timesteps(timesteps=[999, 500, -1])
    with pytest.raises(ValueError, match="strength=0.1 keeps none of the 4 custom timesteps"):
        scheduler.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.1)
    with pytest.raises(ValueError, match="original_inference_steps must be a positive int"):
        scheduler.set_timesteps(4, original_inference_steps=0)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 500.0 is not one of this scheduler's timesteps"):
        scheduler.step(x, 500, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 2, 2\)"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 999, x)
    zero_snr = LCMScheduler(rescale_betas_zero_snr=True)
    zero_snr.set_timesteps(4)
    with pytest.raises(ValueError, match="v_prediction"):  # diffusers returns inf here
        zero_snr.step(x, zero_snr.timesteps[0], x)
    their = TheirLCM(rescale_betas_zero_snr=True)
    their.set_timesteps(4)
    assert not torch.isfinite(their.step(x + 1, their.timesteps[0], x + 1).denoised).all()
