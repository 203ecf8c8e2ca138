"""pare.EDMDPMSolverMultistepScheduler against diffusers': EDM sigmas, preconditioning, whole loops, img2img, configs, errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler as TheirEDM
from diffusers.schedulers import scheduling_edm_dpmsolver_multistep as their_module
from hypothesis import given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, assert_parity
from pare.schedulers.scheduling_edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from parity_tests.scheduler_folders import SHIPPED_SCHEDULERS
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import seeds
from parity_tests.test_scheduling_dpmsolver_multistep import STEP_FP32, make_set, step_counts, steps_to_compare
from parity_tests.test_scheduling_utils import dummy_model

PLAYGROUND_V25_CONFIG = SHIPPED_SCHEDULERS["playground-v2.5"]


def edm_alpha_sigma(sigma):
    return torch.tensor(1.0), sigma  # x = x_0 + sigma eps: alpha_t = 1


@st.composite
def edm_configs(draw):
    """A diffusers EDMDPMSolverMultistepScheduler config with every option drawn (EDM's defaults half the time)."""
    config = dict(
        sigma_min=draw(st.one_of(st.just(0.002), st.floats(1e-3, 0.1))),
        sigma_max=draw(st.one_of(st.just(80.0), st.floats(1.0, 120.0))),
        sigma_data=draw(st.one_of(st.just(0.5), st.floats(0.2, 1.0))),
        sigma_schedule=draw(st.sampled_from(["karras", "exponential"])),
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction"])),
        rho=draw(st.one_of(st.just(7.0), st.floats(2.0, 10.0))),
        solver_order=draw(st.sampled_from([1, 2, 3])),
        thresholding=draw(st.booleans()),
        dynamic_thresholding_ratio=draw(st.floats(0.8, 1.0)),
        sample_max_value=draw(st.floats(1.0, 3.0)),
        algorithm_type=draw(st.sampled_from(["dpmsolver++", "sde-dpmsolver++"])),
        solver_type=draw(st.sampled_from(["midpoint", "heun"])),
        lower_order_final=draw(st.booleans()),
        euler_at_final=draw(st.booleans()),
        final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
    )
    if config["algorithm_type"] == "sde-dpmsolver++" and config["solver_order"] == 3:
        config["solver_order"] = 2  # no such update (test_sde_third_order_is_refused_where_diffusers_fails)
    return config


def set_both(ours, theirs, n):
    ours.set_timesteps(n), theirs.set_timesteps(n)
    for name in ("timesteps", "sigmas"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    return ours.timesteps


@settings(max_examples=30)
@given(config=edm_configs(), n=step_counts, seed=seeds)
def test_edm_dpm_loop_matches_diffusers_step_by_step_fp32(device, config, n, seed):
    ours, theirs = EDMDPMSolverMultistepScheduler(**config), TheirEDM(**config)
    timesteps = set_both(ours, theirs, n)
    x = ours.init_noise_sigma * torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)
    make = make_set(TheirEDM, config, n)
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1, edm_alpha_sigma)
    compare_loops("EDMDPMSolverMultistep loop", ours, make, x, timesteps=timesteps, seed=seed + 1)


@settings(max_examples=10)
@given(config=edm_configs(), n=step_counts, dtype_name=st.sampled_from(["fp16", "bf16", "fp64"]), seed=seeds)
def test_edm_dpm_loop_low_precision_within_the_error_budget(device, config, n, dtype_name, seed):
    ours, theirs = EDMDPMSolverMultistepScheduler(**config), TheirEDM(**config)
    timesteps = set_both(ours, theirs, n)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name]) * 10
    make = make_set(TheirEDM, config, n)
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1, edm_alpha_sigma)
    compare_loops(f"EDMDPMSolverMultistep {dtype_name} loop", ours, make, x, timesteps=timesteps, seed=seed + 1,
                  noise_module=their_module)


def test_playground_v25_config_loads_and_samples_as_diffusers(tmp_path, caplog):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**PLAYGROUND_V25_CONFIG, "skip_prk_steps": True}))
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = EDMDPMSolverMultistepScheduler.from_config(tmp_path)
    assert "skip_prk_steps" in caplog.text  # a key of another class: ignored, named
    theirs = TheirEDM.from_pretrained(tmp_path)
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key
    assert ours.init_noise_sigma == theirs.init_noise_sigma
    ours.set_timesteps(30)

    def make():
        s = TheirEDM.from_pretrained(tmp_path)
        s.set_timesteps(30)
        return s

    x = ours.init_noise_sigma * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    compare_loops("Playground v2.5 loop", ours, make, x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioning_matches_diffusers(prediction_type):
    ours, theirs = EDMDPMSolverMultistepScheduler(prediction_type=prediction_type), TheirEDM(prediction_type=prediction_type)
    x, f = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for sigma in (torch.tensor(0.002), torch.tensor(1.3), torch.tensor(80.0)):
        assert_parity("c_in x", ours.precondition_inputs(x, sigma), theirs.precondition_inputs(x, sigma), tolerance=STEP_FP32)
        assert_parity("x_0", ours.precondition_outputs(x, f, sigma), theirs.precondition_outputs(x, f, sigma),
                      tolerance=STEP_FP32)
        assert torch.equal(ours.precondition_noise(sigma), theirs.precondition_noise(sigma))
    assert torch.equal(ours.precondition_noise(0.5), theirs.precondition_noise(0.5))


@pytest.mark.parametrize("seed", [7])
def test_sde_noise_from_one_seed_is_diffusers_noise(seed):
    config = dict(algorithm_type="sde-dpmsolver++")
    x = 80 * torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    results = []
    for s in (seed, seed + 1):
        ours = EDMDPMSolverMultistepScheduler(**config)
        ours.set_timesteps(20)
        results.append(compare_loops("EDM SDE loop", ours, make_set(TheirEDM, config, 20), x, seed=s)[0])
    assert not torch.allclose(*results)


@pytest.mark.parametrize("begin", [0, 3, 11])
def test_img2img_set_begin_index_and_add_noise_match_diffusers(begin):
    config = dict(solver_order=3, final_sigmas_type="sigma_min")
    ours = EDMDPMSolverMultistepScheduler(**config)
    ours.set_timesteps(15)
    ours.set_begin_index(begin)
    make = make_set(TheirEDM, config, 15, begin)
    theirs = make()
    g = torch.Generator().manual_seed(begin)
    image, noise = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    t0 = ours.timesteps[begin].repeat(2)
    a = ours.add_noise(image, noise, t0)
    assert_parity("EDM img2img add_noise", a, theirs.add_noise(image, noise, t0), tolerance=STEP_FP32)
    timesteps = steps_to_compare(ours, make, ours.timesteps[begin:], a, 0, edm_alpha_sigma)
    compare_loops("EDM img2img loop", ours, make, a, timesteps=timesteps)


def test_add_noise_without_begin_index_matches_diffusers():
    ours, theirs = EDMDPMSolverMultistepScheduler(), TheirEDM()
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = ours.timesteps[[0, 4, 9]]
    assert_parity("EDM add_noise", ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)


def test_zero_length_last_step_is_first_order_where_diffusers_gives_nan():
    """final_sigmas_type='sigma_min' repeats the last Karras level: h = 0 at a second-order heun step (>= 15 steps)."""
    config = dict(final_sigmas_type="sigma_min", solver_type="heun", algorithm_type="sde-dpmsolver++")
    ours, theirs, euler = EDMDPMSolverMultistepScheduler(**config), TheirEDM(**config), TheirEDM(**config, euler_at_final=True)
    for s in (ours, theirs, euler):
        s.set_timesteps(25)
    x = y = z = 80 * torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    g = [torch.Generator().manual_seed(1) for _ in range(3)]
    for t in ours.timesteps[:-1]:
        x = ours.step(dummy_model(ours.scale_model_input(x, t), t), t, x, generator=g[0]).prev_sample
        y = theirs.step(dummy_model(theirs.scale_model_input(y, t), t), t, y, generator=g[1]).prev_sample
        z = euler.step(dummy_model(euler.scale_model_input(z, t), t), t, z, generator=g[2]).prev_sample
    t = ours.timesteps[-1]
    x = ours.step(dummy_model(ours.scale_model_input(x, t), t), t, x, generator=g[0]).prev_sample
    y = theirs.step(dummy_model(theirs.scale_model_input(y, t), t), t, y, generator=g[1]).prev_sample
    assert torch.isnan(y).all()
    # diffusers' euler_at_final step is the SDE's first order; at h = 0 it equals the ODE step pare takes
    z = euler.step(dummy_model(euler.scale_model_input(z, t), t), t, z, generator=g[2]).prev_sample
    assert_parity("EDM zero-length last step", x, z, tolerance=STEP_FP32)


# --- configs and errors --------------------------------------------------------------------------


def test_sample_prediction_is_refused_where_diffusers_fails_in_step():
    theirs = TheirEDM(prediction_type="sample")
    theirs.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="Prediction type sample is not supported"):
        theirs.step(x, theirs.timesteps[0], x)
    with pytest.raises(ValueError, match=r"prediction_type='sample' is not supported; expected one of \('epsilon', 'v_prediction'\)"):
        EDMDPMSolverMultistepScheduler(prediction_type="sample")


def test_sde_third_order_is_refused_where_diffusers_fails():
    theirs = TheirEDM(algorithm_type="sde-dpmsolver++", solver_order=3)
    theirs.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnboundLocalError):
        for t in theirs.timesteps:
            x = theirs.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    with pytest.raises(ValueError, match="no third-order update"):
        EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)


@pytest.mark.parametrize("key, value", [("algorithm_type", "dpmsolver"), ("sigma_schedule", "linear"), ("solver_order", 4),
                                        ("solver_type", "rk4"), ("final_sigmas_type", "one")])
def test_unknown_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        EDMDPMSolverMultistepScheduler.from_config({key: value})


def test_config_round_trips_through_both_libraries(tmp_path):
    ours = EDMDPMSolverMultistepScheduler(sigma_schedule="exponential", sigma_min=0.01, sigma_max=50.0, solver_order=3)
    theirs = TheirEDM.from_pretrained(ours.save_config(tmp_path).parent)
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    assert dict(EDMDPMSolverMultistepScheduler.from_config(dict(theirs.config)).config) == dict(ours.config)


def test_constants_and_initial_state_match_diffusers():
    ours, theirs = EDMDPMSolverMultistepScheduler(), TheirEDM()
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    ours.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    scaled = ours.scale_model_input(x, ours.timesteps[0])
    assert ours.step_index == 0
    theirs.set_timesteps(4)
    assert torch.equal(scaled, theirs.scale_model_input(x, theirs.timesteps[0]))


def test_bad_calls_raise():
    x = torch.zeros(1, 3, 4, 4)
    for cls in (EDMDPMSolverMultistepScheduler, TheirEDM):
        with pytest.raises(ValueError, match="(?i)set_timesteps"):
            cls().step(x, 0.5, x)
    scheduler = EDMDPMSolverMultistepScheduler()
    for n in (0, -2, 2.5, None):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(n)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):  # diffusers: silently the last step
        scheduler.step(x, 0.123, x)
    for t in scheduler.timesteps:
        out = scheduler.step(x, t, x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    with pytest.raises(ValueError, match="all 2 steps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMDPMSolverMultistepScheduler(sigma_min=1.0, sigma_max=0.5)


def test_an_euler_config_with_sigma_min_none_is_refused_naming_the_key():
    """EulerDiscreteScheduler configs carry sigma_min=None: diffusers' EDM twin fails with a TypeError in its formula."""
    with pytest.raises(TypeError):
        TheirEDM(sigma_min=None)
    with pytest.raises(ValueError, match="sigma_min must be a number, got None"):
        EDMDPMSolverMultistepScheduler.from_config({"sigma_min": None})
