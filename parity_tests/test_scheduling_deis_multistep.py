"""pare.DEISMultistepScheduler against diffusers': timesteps and sigmas, whole loops step by step, configs, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DEISMultistepScheduler as TheirDEIS
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, assert_parity
from pare.schedulers.scheduling_deis_multistep import DEISMultistepScheduler
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import scheduler_dtypes, seeds
from parity_tests.test_scheduling_pndm import SD15_PNDM_CONFIG
from parity_tests.test_scheduling_unipc_multistep import SHARED_KEYS, set_both, solver_configs
from parity_tests.test_scheduling_utils import STEP_FP32

DEIS_KEYS = tuple(key for key in SHARED_KEYS if key != "rescale_betas_zero_snr")  # DEIS has no zero-SNR option


@st.composite
def deis_configs(draw):
    config = draw(solver_configs(DEIS_KEYS))
    config.update(solver_order=draw(st.sampled_from([1, 2, 3, 3])), lower_order_final=draw(st.booleans()))
    return config


@settings(max_examples=40)
@given(config=deis_configs(), data=st.data())
def test_deis_timesteps_and_sigmas_equal_diffusers(config, data):
    n = data.draw(st.one_of(st.integers(1, 100), st.integers(1, config["num_train_timesteps"])), label="n")
    set_both(DEISMultistepScheduler(**config), TheirDEIS(**config), n)


def deis_state_matches(ours, theirs):
    assert ours.lower_order_nums == theirs.lower_order_nums and ours.step_index == theirs.step_index


@settings(max_examples=40)
@given(config=deis_configs(), n=st.one_of(st.integers(1, 100), st.sampled_from([1, 2, 3, 14, 15, 16, 61])),
       dtype_name=scheduler_dtypes, seed=seeds)
def test_deis_loop_matches_diffusers_step_by_step(device, config, n, dtype_name, seed):
    """Every intermediate sample, orders 1-3, every option; n around 15 switches lower_order_final on and off."""
    ours = DEISMultistepScheduler(**config)
    timesteps = set_both(ours, TheirDEIS(**config), n)
    if timesteps is None:
        return
    begin = len(timesteps) > 1 and timesteps[0] == timesteps[1]  # see the class doc: a repeated first timestep
    if begin:
        event("repeated first timestep: set_begin_index(0)")
        ours.set_begin_index(0)

    def make_theirs():
        theirs = TheirDEIS(**config)
        theirs.set_timesteps(n)
        if begin:
            theirs.set_begin_index(0)
        return theirs

    # diffusers' trailing overshoot adds a last step from sigma_0 to sigma_0 (h = 0); every step before it is pare's
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    compare_loops(f"DEIS {n} steps", ours, make_theirs, x, timesteps=timesteps, check_state=deis_state_matches)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
def test_deis_sd_loops_match_diffusers(solver_order, use_karras_sigmas):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=solver_order,
                  use_karras_sigmas=use_karras_sigmas)
    for n in (5, 20):
        ours = DEISMultistepScheduler(**config)
        ours.set_timesteps(n)

        def make_theirs():
            theirs = TheirDEIS(**config)
            theirs.set_timesteps(n)
            return theirs

        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        compare_loops(f"DEIS SD order {solver_order}", ours, make_theirs, x, check_state=deis_state_matches)


def test_deis_img2img_start_matches_diffusers():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, theirs = DEISMultistepScheduler(solver_order=3), TheirDEIS(solver_order=3)
    ours.set_timesteps(12), theirs.set_timesteps(12)
    t = ours.timesteps[5:6].repeat(2)
    assert_parity("DEIS add_noise", ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)
    ours.set_begin_index(5), theirs.set_begin_index(5)
    latents = ours.add_noise(x0, noise, t)
    assert_parity("DEIS add_noise at begin_index", latents, theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)
    compare_loops("DEIS from begin_index 5", ours, lambda: theirs, latents, timesteps=ours.timesteps[5:],
                  check_state=deis_state_matches)


def test_deis_loads_other_configs_as_diffusers(caplog):
    """DPM-Solver and UniPC configs (their algorithm_type / solver_type read as DEIS'), SD1.5's PNDM config."""
    from diffusers import DPMSolverMultistepScheduler as TheirDPM
    from diffusers import UniPCMultistepScheduler as TheirUniPC

    dpm = {**dict(TheirDPM(beta_schedule="scaled_linear", solver_order=3).config), "_use_default_values": []}
    unipc = {**dict(TheirUniPC(beta_schedule="scaled_linear", solver_type="bh1").config), "_use_default_values": []}
    for written, ignored in ((dpm, "euler_at_final"), (unipc, "predict_x0"), (SD15_PNDM_CONFIG, "skip_prk_steps")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pare"):
            ours = DEISMultistepScheduler.from_config(written)
        assert ignored in caplog.text
        theirs = TheirDEIS.from_config(written)
        assert all(theirs.config[k] == v for k, v in ours.config.items()), {
            k: (v, theirs.config[k]) for k, v in ours.config.items() if theirs.config[k] != v}
        assert (ours.config.algorithm_type, ours.config.solver_type) == ("deis", "logrho")
        ours.set_timesteps(12), theirs.set_timesteps(12)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
        if written is not SD15_PNDM_CONFIG:
            assert "as diffusers does" in caplog.text  # the value remapping is logged


@pytest.mark.parametrize("key, value", [("algorithm_type", "unipc"), ("solver_type", "bh3"), ("solver_order", 4),
                                        ("prediction_type", "flow_prediction"), ("timestep_spacing", "karras")])
def test_deis_refuses_unknown_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"DEISMultistepScheduler: {key}={value!r} is not supported; expected one of \("):
        DEISMultistepScheduler.from_config({"_class_name": "DEISMultistepScheduler", key: value})


def test_deis_refuses_flow_matching():
    with pytest.raises(ValueError, match=r"sets use_flow_sigmas=True, which pare does not implement"):
        DEISMultistepScheduler.from_config({"use_flow_sigmas": True})
    with pytest.raises(ValueError, match="flow-matching"):
        DEISMultistepScheduler().set_timesteps(10, mu=0.5)


def test_deis_config_round_trips_through_diffusers(tmp_path):
    ours = DEISMultistepScheduler(solver_order=3, use_exponential_sigmas=True, timestep_spacing="trailing")
    theirs = TheirDEIS.from_pretrained(ours.save_config(tmp_path).parent)
    assert dict(DEISMultistepScheduler.from_config(dict(theirs.config)).config) == dict(ours.config)
    assert dict(DEISMultistepScheduler.from_pretrained(tmp_path).config) == dict(ours.config)


def test_deis_constants_match_diffusers():
    ours, theirs = DEISMultistepScheduler(), TheirDEIS()
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = torch.randn(1, 2, 3, 3)
    assert ours.scale_model_input(x, 5) is x


def test_deis_bad_calls_raise():
    x = torch.zeros(1, 1, 2, 2)
    scheduler = DEISMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="past the last trained timestep"):
        DEISMultistepScheduler(timestep_spacing="leading", steps_offset=5).set_timesteps(499)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.step(x, 998, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 2, 2\)"):
        scheduler.step(torch.zeros(1, 2, 2, 2), scheduler.timesteps[0], x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_deis_trailing_overshoot_is_dropped_and_the_rest_matches(solver_order):
    """diffusers' trailing spacing visits 62 timesteps for 61 steps, the last (-1) from sigma_0 to sigma_0; pare stops before it."""
    config = dict(timestep_spacing="trailing", solver_order=solver_order)
    ours = DEISMultistepScheduler(**config)

    def make_theirs():
        theirs = TheirDEIS(**config)
        theirs.set_timesteps(61)
        return theirs

    ours.set_timesteps(61)
    assert len(make_theirs().timesteps) == 62 and make_theirs().timesteps[-1] == -1
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    x_ours, x_theirs, theirs = compare_loops("DEIS trailing 61", ours, make_theirs, x, check_state=deis_state_matches)
    extra = theirs.step(x_theirs, theirs.timesteps[-1], x_theirs).prev_sample  # diffusers' extra step changes nothing
    assert_parity("DEIS extra step", extra, x_ours, tolerance=STEP_FP32)
