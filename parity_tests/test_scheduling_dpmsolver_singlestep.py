"""pare.DPMSolverSinglestepScheduler against diffusers': order lists, whole loops step by step, SDE noise, img2img, configs, errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as TheirMultistep
from diffusers import DPMSolverSinglestepScheduler as TheirDPM
from diffusers.schedulers import scheduling_dpmsolver_singlestep as their_module
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, assert_parity
from pare.schedulers.scheduling_dpmsolver_singlestep import DPMSolverSinglestepScheduler
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import seeds
from parity_tests.test_scheduling_dpmsolver_multistep import (
    STEP_FP32,
    begin_index_for,
    dpm_configs,
    make_set,
    set_both,
    step_counts,
    steps_to_compare,
)
from parity_tests.test_scheduling_pndm import SD15_PNDM_CONFIG
from parity_tests.test_scheduling_utils import dummy_model


def set_both_and_check_orders(ours, theirs, n):
    timesteps = set_both(ours, theirs, n)
    if timesteps is not None:
        assert ours.order_list == theirs.order_list
        assert ours.config.lower_order_final == theirs.config.lower_order_final  # diffusers' config change, mirrored
    return timesteps


@settings(max_examples=35)
@given(config=dpm_configs(singlestep=True), n=step_counts, seed=seeds)
def test_dpm_singlestep_loop_matches_diffusers_step_by_step_fp32(device, config, n, seed):
    # diffusers fails with dpmsolver + thresholding (test_dpmsolver_thresholding_works_where_diffusers_fails)
    config["thresholding"] = config["thresholding"] and config["algorithm_type"] != "dpmsolver"
    ours, theirs = DPMSolverSinglestepScheduler(**config), TheirDPM(**config)
    timesteps = set_both_and_check_orders(ours, theirs, n)
    if timesteps is None:
        return
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)
    make = make_set(TheirDPM, config, n, begin_index_for(ours))
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1)
    compare_loops("DPMSolverSinglestep loop", ours, make, x, timesteps=timesteps, seed=seed + 1)


@settings(max_examples=10)
@given(config=dpm_configs(singlestep=True), n=step_counts, dtype_name=st.sampled_from(["fp16", "bf16", "fp64"]),
       seed=seeds)
def test_dpm_singlestep_loop_low_precision_within_the_error_budget(device, config, n, dtype_name, seed):
    """fp16 / bf16 judged by err64; the SDE noise is drawn in the model's dtype (upcast for the float64 reference)."""
    config["thresholding"] = config["thresholding"] and config["algorithm_type"] != "dpmsolver"
    ours, theirs = DPMSolverSinglestepScheduler(**config), TheirDPM(**config)
    timesteps = set_both_and_check_orders(ours, theirs, n)
    if timesteps is None:
        return
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    make = make_set(TheirDPM, config, n, begin_index_for(ours))
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1)
    compare_loops(f"DPMSolverSinglestep {dtype_name} loop", ours, make, x, timesteps=timesteps, seed=seed + 1,
                  noise_module=their_module)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_order_lists_and_the_config_change_match_diffusers_for_every_step_count(caplog, final_sigmas_type,
                                                                                 lower_order_final, solver_order):
    config = dict(final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final, solver_order=solver_order)
    for n in range(1, 101):
        ours, theirs = DPMSolverSinglestepScheduler(**config), TheirDPM(**config)
        assert ours.order_list == theirs.order_list  # over num_train_timesteps, at construction
        with caplog.at_level(logging.WARNING, logger="pare"):
            ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.order_list == theirs.order_list, n
        assert len(ours.order_list) == n
        changed = theirs.config.lower_order_final != lower_order_final
        assert ours.config.lower_order_final == theirs.config.lower_order_final, n
        assert ("setting lower_order_final=True" in caplog.text) == changed
        caplog.clear()


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("begin", [1, 2, 5])
def test_img2img_starting_mid_group_matches_diffusers(solver_order, begin):
    """set_begin_index mid-group: the first step's order drops to what the (empty) history allows, in both."""
    config = dict(solver_order=solver_order, algorithm_type="sde-dpmsolver++", lower_order_final=True)
    ours = DPMSolverSinglestepScheduler(**config)
    ours.set_timesteps(12)
    ours.set_begin_index(begin)
    make = make_set(TheirDPM, config, 12, begin)
    theirs = make()
    g = torch.Generator().manual_seed(begin)
    image, noise = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    t0 = ours.timesteps[begin].repeat(2)
    a = ours.add_noise(image, noise, t0)
    assert_parity("img2img add_noise", a, theirs.add_noise(image, noise, t0), tolerance=STEP_FP32)
    compare_loops("img2img singlestep loop", ours, make, a, timesteps=ours.timesteps[begin:], seed=3)


@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_sde_noise_from_one_seed_is_diffusers_noise(solver_order):
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=solver_order, beta_schedule="scaled_linear",
                  beta_start=0.00085, beta_end=0.012)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    results = []
    for seed in (7, 8):
        ours = DPMSolverSinglestepScheduler(**config)
        ours.set_timesteps(20)
        results.append(compare_loops("SDE singlestep loop", ours, make_set(TheirDPM, config, 20), x, seed=seed)[0])
    assert not torch.allclose(*results)  # the noise really comes from the generator
    ours, theirs = DPMSolverSinglestepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(20), theirs.set_timesteps(20)
    t = ours.timesteps[0]
    a = ours.step(dummy_model(x, t), t, x, generator=[torch.Generator().manual_seed(i) for i in range(3)]).prev_sample
    b = theirs.step(dummy_model(x, t), t, x, generator=[torch.Generator().manual_seed(i) for i in range(3)]).prev_sample
    assert_parity("SDE step, a generator per batch element", a, b, tolerance=STEP_FP32)


def test_dpmsolver_thresholding_works_where_diffusers_fails():
    """diffusers' singlestep convert_model_output indexes alpha_t[timestep] with timestep None (a shape error);
    pare thresholds at the current sigma, as diffusers' multistep twin does: the first (first-order) steps agree."""
    config = dict(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min", solver_order=1,
                  sample_max_value=1.5)
    ours, theirs, multistep = DPMSolverSinglestepScheduler(**config), TheirDPM(**config), TheirMultistep(**config)
    for s in (ours, theirs, multistep):
        s.set_timesteps(10)
    assert torch.equal(ours.sigmas, multistep.sigmas)
    x = 3 * torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[0]
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs.step(dummy_model(x, t), t, x)
    compare_loops("singlestep order 1 vs diffusers multistep", ours, lambda: _set(TheirMultistep(**config), 10), x)


def _set(scheduler, n):
    scheduler.set_timesteps(n)
    return scheduler


@pytest.mark.parametrize("timesteps", [[999, 800, 601, 400, 200, 50], [500, 1]])
def test_custom_timesteps_match_diffusers(timesteps):
    config = dict(final_sigmas_type="sigma_min", solver_order=3, lower_order_final=True)
    ours, theirs = DPMSolverSinglestepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(timesteps=timesteps), theirs.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.order_list == theirs.order_list

    def make():
        s = TheirDPM(**config)
        s.set_timesteps(timesteps=timesteps)
        return s

    compare_loops("custom timesteps", ours, make, torch.randn(1, 3, 4, 4))


# --- configs -------------------------------------------------------------------------------------


def test_sd15_config_loads_with_a_note_and_samples_as_diffusers(tmp_path, caplog):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_PNDM_CONFIG))
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = DPMSolverSinglestepScheduler.from_config(tmp_path)
    for key in ("skip_prk_steps", "set_alpha_to_one", "clip_sample", "steps_offset"):  # not singlestep keys
        assert key in caplog.text
    theirs = TheirDPM.from_pretrained(tmp_path)
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key
    ours.set_timesteps(20)
    compare_loops("SD1.5 config loop", ours, lambda: _set(TheirDPM.from_pretrained(tmp_path), 20), torch.randn(1, 4, 6, 6))


@settings(max_examples=10)
@given(config=dpm_configs(singlestep=True))
def test_every_config_diffusers_writes_loads(config):
    theirs = TheirDPM(**config)
    ours = DPMSolverSinglestepScheduler.from_config(theirs.config)
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


@pytest.mark.parametrize("key, value", [("algorithm_type", "sde-dpmsolver"), ("solver_order", 4), ("solver_type", "rk4"),
                                        ("final_sigmas_type", "one"), ("prediction_type", "flow_prediction"),
                                        ("use_flow_sigmas", True)])
def test_unknown_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        DPMSolverSinglestepScheduler.from_config({key: value})


def test_constants_and_initial_state_match_diffusers():
    ours, theirs = DPMSolverSinglestepScheduler(), TheirDPM()
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    for name in ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ours.sample is None and ours.model_outputs == [None, None]


def test_bad_calls_raise():
    x = torch.zeros(1, 3, 4, 4)
    for cls in (DPMSolverSinglestepScheduler, TheirDPM):
        with pytest.raises(ValueError, match="(?i)set_timesteps"):
            cls().step(x, 999, x)
        with pytest.raises(ValueError, match="(?i)one of"):
            cls().set_timesteps(10, timesteps=[500, 100])
        with pytest.raises(ValueError, match="(?i)timesteps.*use_karras_sigmas"):
            cls(use_karras_sigmas=True).set_timesteps(timesteps=[500, 100])
    scheduler = DPMSolverSinglestepScheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.step(x, 5, x)
    for t in scheduler.timesteps:
        scheduler.step(x, t, x)
    with pytest.raises(ValueError, match="all 2 steps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="must be distinct"):
        DPMSolverSinglestepScheduler().set_timesteps(1000)
    out = scheduler.step  # return_dict=False: a 1-tuple, as diffusers
    scheduler.set_timesteps(3)
    result = out(x, scheduler.timesteps[0], x, return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1
