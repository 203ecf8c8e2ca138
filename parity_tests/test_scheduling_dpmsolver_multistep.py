"""pare.DPMSolverMultistepScheduler against diffusers': schedules, whole loops step by step, SDE noise, img2img, configs, errors.

Also home of what the singlestep and EDM tests share: `set_both` (set_timesteps on both, with pare's
documented refusals) and `zero_length_last_step`.
"""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler as TheirDEIS
from diffusers import DPMSolverMultistepScheduler as TheirDPM
from diffusers import UniPCMultistepScheduler as TheirUniPC
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pare.parity import DTYPES, Tolerance, assert_parity
from pare.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler, degenerate_step, vp_alpha_sigma
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import seeds
from parity_tests.test_scheduling_pndm import SD15_PNDM_CONFIG
from parity_tests.test_scheduling_utils import dummy_model

STEP_FP32 = Tolerance(rel_l2=1e-6)  # the bar for every intermediate sample in float32
SIGMA_OPTIONS = (None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
step_counts = st.one_of(st.integers(1, 100), st.sampled_from([1, 2, 3, 14, 15, 25, 61]))


@st.composite
def dpm_configs(draw, singlestep: bool = False, num_train_timesteps=st.one_of(st.just(1000), st.integers(150, 1000))):
    """A diffusers config for DPMSolverMultistepScheduler (or, `singlestep`, DPMSolverSinglestepScheduler), every option drawn."""
    T = draw(num_train_timesteps)
    algorithms = ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"] + ([] if singlestep else ["sde-dpmsolver"])
    config = dict(
        num_train_timesteps=T,
        beta_start=draw(st.floats(1e-5, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        trained_betas=None,
        solver_order=draw(st.sampled_from([1, 2, 3])),
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        thresholding=draw(st.booleans()),
        dynamic_thresholding_ratio=draw(st.floats(0.8, 1.0)),
        sample_max_value=draw(st.floats(1.0, 3.0)),
        algorithm_type=draw(st.sampled_from(algorithms)),
        solver_type=draw(st.sampled_from(["midpoint", "heun"])),
        lower_order_final=draw(st.booleans()),
        final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
        lambda_min_clipped=draw(st.sampled_from([-float("inf"), -float("inf"), -5.1, -3.0])),
    )
    sigma_option = draw(st.sampled_from(SIGMA_OPTIONS[:4] if singlestep else SIGMA_OPTIONS))
    if sigma_option:
        config[sigma_option] = True
    if not singlestep:
        config.update(
            euler_at_final=draw(st.booleans()),
            timestep_spacing=draw(st.sampled_from(["linspace", "leading", "trailing"])),
            steps_offset=draw(st.sampled_from([0, 0, 1, 2])),
            rescale_betas_zero_snr=draw(st.booleans()),
        )
    if draw(st.integers(0, 5)) == 0:  # now and then a checkpoint's own betas
        low, high = draw(st.floats(1e-5, 1e-3)), draw(st.floats(5e-3, 3e-2))
        config["trained_betas"] = [low + (high - low) * (i / (T - 1)) ** 2 for i in range(T)]
    if config["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
        config["final_sigmas_type"] = "sigma_min"  # noise prediction cannot reach sigma = 0 (both libraries raise)
    if config["algorithm_type"] == "sde-dpmsolver" and config["solver_order"] == 3:
        config["solver_order"] = 2  # no such update in either library (test_sde_dpmsolver_third_order_is_refused)
    return config


def set_both(ours, theirs, n):
    """set_timesteps(n) on both. Returns the timesteps to compare over, or None where pare refuses on purpose."""
    theirs.set_timesteps(n)
    try:
        ours.set_timesteps(n)
    except ValueError as e:
        message, t = str(e), theirs.timesteps
        if "past the last trained timestep" in message:
            assert int(t.max()) >= ours.config.num_train_timesteps  # diffusers really leaves the trained range
            event("leading spacing past T-1: pare raises")
        else:
            assert "must be distinct" in message, message
            assert len(t) == 0 or bool((t[1:] >= t[:-1]).any())  # diffusers' timesteps repeat (h = 0 between them)
            event("repeated timesteps: pare raises")
        return None
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    expected_t, expected_sigmas = theirs.timesteps, theirs.sigmas
    if bool((expected_t < 0).any()):
        # diffusers' trailing overshoot (np.arange, e.g. n = 61 of T = 1000) adds timestep -1; pare drops it.
        assert ours.config.timestep_spacing == "trailing"
        keep = expected_t >= 0
        expected_t = expected_t[keep]
        expected_sigmas = torch.cat([theirs.sigmas[:-1][keep], theirs.sigmas[-1:]])
        assert torch.equal(ours.timesteps, expected_t) and torch.equal(ours.sigmas[:-1], expected_sigmas[:-1])
        event("diffusers' trailing overshoot: pare drops timestep -1")
        return ours.timesteps[:-2]  # the last two steps differ: diffusers takes one more
    assert torch.equal(ours.timesteps, expected_t)
    assert torch.equal(ours.sigmas, expected_sigmas), f"sigmas differ: max {(ours.sigmas - expected_sigmas).abs().max():.3e}"
    assert ours.num_inference_steps == theirs.num_inference_steps
    return ours.timesteps


def note(message: str) -> None:
    """hypothesis' `event`, also callable from a plain test."""
    try:
        event(message)
    except InvalidArgument:
        pass


def zero_length_last_step(scheduler, alpha_sigma) -> bool:
    """Whether the last step is `degenerate_step` (h = 0, or an ulp below for an SDE), where diffusers may give NaN."""
    return degenerate_step(scheduler.config.algorithm_type, *alpha_sigma(scheduler.sigmas[-1]), *alpha_sigma(scheduler.sigmas[-2]))


def steps_to_compare(ours, make_theirs, timesteps, x, seed, alpha_sigma=vp_alpha_sigma):
    """`timesteps`, without the last where it is a zero-length step and diffusers' loop ends in NaN there
    (heun, third order, SDE: test_zero_length_last_step_is_first_order_where_diffusers_gives_nan)."""
    if len(timesteps) == 0 or timesteps[-1] != ours.timesteps[-1] or not zero_length_last_step(ours, alpha_sigma):
        return timesteps  # not up to the last step, or no zero-length one
    theirs, generator = make_theirs(), torch.Generator().manual_seed(seed)
    for t in timesteps:
        x = theirs.step(dummy_model(theirs.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    if bool(torch.isfinite(x).all()):
        note("zero-length last step: diffusers finite, compared")
        return timesteps
    note("zero-length last step: diffusers NaN, not compared")
    return timesteps[:-1]


def make_set(cls, config, n, begin_index=None):
    def make():
        scheduler = cls(**config)
        scheduler.set_timesteps(n)
        if begin_index is not None:
            scheduler.set_begin_index(begin_index)
        return scheduler

    return make


def begin_index_for(ours) -> int | None:
    """0 for diffusers where the schedule repeats its first timestep (cosine betas with Karras / exponential / beta
    sigmas truncate fractional timesteps to the same one), else None. There diffusers' "second match" rule starts
    the loop at step 1 and runs out of noise levels at the end; pare starts at 0 on its own
    (`SigmaSchedulerMixin._init_step_index`), as diffusers does after set_begin_index(0)."""
    t = ours.timesteps
    if len(t) > 1 and t[0] == t[1]:
        event("repeated first timestep: pare starts at 0, diffusers with set_begin_index(0)")
        return 0
    return None


# --- whole loops ---------------------------------------------------------------------------------


@settings(max_examples=45)
@given(config=dpm_configs(), n=step_counts, seed=seeds)
def test_dpm_multistep_loop_matches_diffusers_step_by_step_fp32(device, config, n, seed):
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    timesteps = set_both(ours, theirs, n)
    if timesteps is None:
        return
    event(f"{config['algorithm_type']} order {config['solver_order']}")
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)
    make = make_set(TheirDPM, config, n, begin_index_for(ours))
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1)
    compare_loops("DPMSolverMultistep loop", ours, make, x, timesteps=timesteps, seed=seed + 1)


@settings(max_examples=12)
@given(config=dpm_configs(), n=step_counts, dtype_name=st.sampled_from(["fp16", "bf16", "fp64"]), seed=seeds)
def test_dpm_multistep_loop_low_precision_within_the_error_budget(device, config, n, dtype_name, seed):
    """fp16 / bf16 judged by err64 against diffusers' own loop on the upcast input (the SDE noise is float32 in both)."""
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    timesteps = set_both(ours, theirs, n)
    if timesteps is None:
        return
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    make = make_set(TheirDPM, config, n, begin_index_for(ours))
    timesteps = steps_to_compare(ours, make, timesteps, x, seed + 1)
    compare_loops(f"DPMSolverMultistep {dtype_name} loop", ours, make, x, timesteps=timesteps, seed=seed + 1)


@pytest.mark.parametrize("algorithm_type, solver_order", [("sde-dpmsolver++", 1), ("sde-dpmsolver++", 2), ("sde-dpmsolver++", 3),
                                                          ("sde-dpmsolver", 1), ("sde-dpmsolver", 2)])
def test_sde_noise_from_one_seed_is_diffusers_noise(algorithm_type, solver_order):
    config = dict(algorithm_type=algorithm_type, solver_order=solver_order, final_sigmas_type="sigma_min",
                  timestep_spacing="trailing", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(20)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    last = compare_loops("SDE loop, one generator", ours, make_set(TheirDPM, config, 20), x, seed=7)[0]
    again = DPMSolverMultistepScheduler(**config)
    again.set_timesteps(20)
    other = compare_loops("SDE loop, another seed", again, make_set(TheirDPM, config, 20), x, seed=8)[0]
    assert not torch.allclose(last, other)  # the noise really comes from the generator

    # a generator per batch element, and noise handed in as variance_noise
    for kwargs in ({"generator": [torch.Generator().manual_seed(i) for i in range(3)]}, {"variance_noise": torch.randn_like(x)}):
        ours.set_timesteps(20)
        theirs = make_set(TheirDPM, config, 20)()
        t = ours.timesteps[0]
        a = ours.step(dummy_model(x, t), t, x, **kwargs).prev_sample
        kwargs = {k: [torch.Generator().manual_seed(i) for i in range(3)] if k == "generator" else v for k, v in kwargs.items()}
        b = theirs.step(dummy_model(x, t), t, x, **kwargs).prev_sample
        assert_parity(f"SDE step with {list(kwargs)}", a, b, tolerance=STEP_FP32)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_learned_variance_outputs_drop_the_variance_like_diffusers(variance_type, algorithm_type):
    config = dict(variance_type=variance_type, algorithm_type=algorithm_type, final_sigmas_type="sigma_min", solver_order=3)
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(12), theirs.set_timesteps(12)
    x = y = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))  # RGB: diffusers keeps channels [:3]
    for i, t in enumerate(ours.timesteps):
        x = ours.step(dummy_model(x, t, variance_type), t, x).prev_sample
        y = theirs.step(dummy_model(y, t, variance_type), t, y).prev_sample
        assert_parity(f"{variance_type} step {i}", x, y, tolerance=STEP_FP32)


def test_learned_variance_of_a_latent_model_keeps_its_channels_where_diffusers_fails():
    """diffusers keeps output channels [:3]: a 4-channel latent model's (B, 8, H, W) output fails; pare keeps [:4]."""
    config = dict(variance_type="learned_range")
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x = torch.randn(1, 4, 4, 4)
    output = dummy_model(x, ours.timesteps[0], "learned_range")  # (1, 8, 4, 4)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs.step(output, theirs.timesteps[0], x)
    plain = DPMSolverMultistepScheduler()
    plain.set_timesteps(10)
    expected = plain.step(output[:, :4], plain.timesteps[0], x).prev_sample
    assert torch.equal(ours.step(output, ours.timesteps[0], x).prev_sample, expected)


def test_zero_length_last_step_is_first_order_where_diffusers_gives_nan():
    """Karras sigmas end at sigma_min and final_sigmas_type='sigma_min' repeats it: h = 0 at the last step.

    With >= 15 steps the last step is second order; diffusers' heun coefficient (e^-h - 1) / h is then 0 / 0.
    pare takes the first-order step, the h -> 0 limit, which is what diffusers gives with euler_at_final=True.
    """
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun", algorithm_type="dpmsolver",
                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours, theirs, euler = DPMSolverMultistepScheduler(**config), TheirDPM(**config), TheirDPM(**config, euler_at_final=True)
    for s in (ours, theirs, euler):
        s.set_timesteps(25)
    assert zero_length_last_step(ours, vp_alpha_sigma)
    x = y = z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        x = ours.step(dummy_model(x, t), t, x).prev_sample
        y = theirs.step(dummy_model(y, t), t, y).prev_sample
        z = euler.step(dummy_model(z, t), t, z).prev_sample
    assert torch.isnan(y).all()
    assert_parity("zero-length last step", x, z, tolerance=STEP_FP32)


# --- schedules -----------------------------------------------------------------------------------


def test_trailing_overshoot_is_dropped():
    ours, theirs = DPMSolverMultistepScheduler(timestep_spacing="trailing"), TheirDPM(timestep_spacing="trailing")
    ours.set_timesteps(61), theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and theirs.timesteps[-1] == -1  # np.arange's extra float step
    assert len(ours.timesteps) == 61 and torch.equal(ours.timesteps, theirs.timesteps[:61])
    assert ours.sigmas[-1] == 0 and torch.equal(ours.sigmas[:-1], theirs.sigmas[:61])


@pytest.mark.parametrize("spacing, n", [("linspace", 1000), ("leading", 1000)])
def test_repeated_timesteps_are_refused(spacing, n):
    theirs = TheirDPM(timestep_spacing=spacing)
    theirs.set_timesteps(n)
    assert bool((theirs.timesteps[1:] >= theirs.timesteps[:-1]).any())
    with pytest.raises(ValueError, match="must be distinct"):
        DPMSolverMultistepScheduler(timestep_spacing=spacing).set_timesteps(n)


def test_leading_past_the_last_timestep_is_refused():
    theirs = TheirDPM(timestep_spacing="leading", steps_offset=2)
    theirs.set_timesteps(999)
    assert int(theirs.timesteps.max()) > 999  # diffusers hands the model t = 1001 and clamps its sigma
    with pytest.raises(ValueError, match="past the last trained timestep 999"):
        DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=2).set_timesteps(999)


@pytest.mark.parametrize("timesteps", [[999, 800, 601, 400, 200, 50, 1], [500], [999, 998, 3, 0]])
def test_custom_timesteps_match_diffusers(timesteps):
    config = dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++", solver_order=3)
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(timesteps=timesteps), theirs.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)

    def make():
        s = TheirDPM(**config)
        s.set_timesteps(timesteps=timesteps)
        return s

    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    compare_loops("custom timesteps", ours, make, x, timesteps=steps_to_compare(ours, make, ours.timesteps, x, 2), seed=2)


@pytest.mark.parametrize("bad", [[5, 10], [1000, 3], [3, -1], []])
def test_bad_custom_timesteps_are_refused(bad):
    with pytest.raises(ValueError, match="timesteps"):
        DPMSolverMultistepScheduler().set_timesteps(timesteps=bad)


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_custom_timesteps_with_a_sigma_spacing_raise_like_diffusers(flag):
    for cls in (DPMSolverMultistepScheduler, TheirDPM):
        with pytest.raises(ValueError, match=r"(?i)timesteps.*" + flag):
            cls(**{flag: True}).set_timesteps(timesteps=[900, 500, 100])


# --- img2img -------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(config=dpm_configs(), n=st.integers(2, 60), strength=st.floats(0.1, 0.95), seed=seeds)
def test_img2img_set_begin_index_and_add_noise_match_diffusers(config, n, strength, seed):
    """The img2img pipeline's order: set_timesteps, skip the first steps, set_begin_index, add_noise, loop."""
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    timesteps = set_both(ours, theirs, n)
    if timesteps is None or len(timesteps) < 2:
        return
    begin = min(int(len(ours.timesteps) * (1 - strength)), len(timesteps) - 1)
    g = torch.Generator().manual_seed(seed)
    image, noise = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)

    def make():
        s = TheirDPM(**config)
        s.set_timesteps(n)
        s.set_begin_index(begin)
        return s

    ours.set_begin_index(begin)
    theirs = make()
    t0 = ours.timesteps[begin].repeat(2)
    a, b = ours.add_noise(image, noise, t0), theirs.add_noise(image, noise, t0)
    assert_parity("img2img add_noise", a, b, tolerance=STEP_FP32)
    timesteps = steps_to_compare(ours, make, timesteps[begin:], a, seed)
    compare_loops("img2img loop", ours, make, a, timesteps=timesteps, seed=seed)


def test_add_noise_without_begin_index_and_mid_loop_match_diffusers():
    ours, theirs = DPMSolverMultistepScheduler(), TheirDPM()
    ours.set_timesteps(20), theirs.set_timesteps(20)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = ours.timesteps[[0, 7, 19]]
    assert_parity("add_noise by timestep", ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)
    for s in (ours, theirs):  # inpainting: after the first step, add_noise uses the current step
        s.set_begin_index(0)
        s.step(dummy_model(x0, s.timesteps[0]), s.timesteps[0], x0)
    assert ours.step_index == theirs.step_index == 1
    assert_parity("add_noise mid-loop", ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)


def test_solver_state_matches_diffusers_after_every_step():
    config = dict(solver_order=3, lower_order_final=True)
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(9), theirs.set_timesteps(9)
    x = torch.randn(1, 3, 4, 4)
    for t in ours.timesteps:
        ours.step(dummy_model(x, t), t, x), theirs.step(dummy_model(x, t), t, x)
        assert ours.step_index == theirs.step_index and ours.lower_order_nums == theirs.lower_order_nums
        for a, b in zip(ours.model_outputs, theirs.model_outputs):
            assert (a is None) == (b is None)
            if a is not None:
                assert_parity("model_outputs", a, b, tolerance=STEP_FP32)


# --- configs -------------------------------------------------------------------------------------


# A fine-tune's DPM++ 2M Karras config, with the DDIM / PNDM keys such configs carry.
DPMPP_2M_KARRAS_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.21.0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "solver_order": 2, "solver_type": "midpoint", "steps_offset": 1, "thresholding": False, "trained_betas": None,
    "use_karras_sigmas": True,
}


@pytest.mark.parametrize("config", [SD15_PNDM_CONFIG, DPMPP_2M_KARRAS_CONFIG], ids=["sd15-pndm", "dpmpp-2m-karras"])
def test_shipped_configs_load_with_a_note_and_sample_as_diffusers(tmp_path, caplog, config):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = DPMSolverMultistepScheduler.from_config(tmp_path)
    for key in ("skip_prk_steps", "set_alpha_to_one", "clip_sample"):  # PNDM's / DDIM's keys: ignored, named
        assert key in caplog.text
    theirs = TheirDPM.from_pretrained(tmp_path)
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key
    pipeline = tmp_path / "pipeline"
    (pipeline / "scheduler").mkdir(parents=True)
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert dict(DPMSolverMultistepScheduler.from_pretrained(pipeline, subfolder="scheduler").config) == dict(ours.config)
    ours.set_timesteps(25), theirs.set_timesteps(25)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = torch.randn(1, 4, 6, 6)
    compare_loops("shipped config loop", ours, lambda: _from_pretrained_set(tmp_path, 25), x)


def _from_pretrained_set(path, n):
    s = TheirDPM.from_pretrained(path)
    s.set_timesteps(n)
    return s


def test_unipc_config_loads_as_midpoint_like_diffusers(caplog):
    unipc = {"_class_name": "UniPCMultistepScheduler", **{k: v for k, v in TheirUniPC().config.items() if not k.startswith("_")}}
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = DPMSolverMultistepScheduler.from_config(unipc)
    assert "bh2" in caplog.text and "predict_x0" in caplog.text and "disable_corrector" in caplog.text
    theirs = TheirDPM(**{k: v for k, v in unipc.items() if k in TheirDPM().config and not k.startswith("_")})
    assert ours.config.solver_type == theirs.config.solver_type == "midpoint"
    assert ours.config.algorithm_type == theirs.config.algorithm_type == "dpmsolver++"


def test_deis_config_loads_as_dpmsolver_pp_where_diffusers_raises():
    """diffusers maps algorithm_type='deis' to 'dpmsolver++' but then checks the *original* value against
    final_sigmas_type='zero' and raises; pare completes the remapping it intends."""
    deis = {k: v for k, v in TheirDEIS().config.items() if not k.startswith("_")}
    assert deis["algorithm_type"] == "deis" and deis["solver_type"] == "logrho"
    with pytest.raises(ValueError, match="algorithm_type` deis"):
        TheirDPM(**{k: v for k, v in deis.items() if k in TheirDPM().config})
    ours = DPMSolverMultistepScheduler.from_config(deis)
    assert ours.config.algorithm_type == "dpmsolver++" and ours.config.solver_type == "midpoint"
    theirs = TheirDPM(**{k: v for k, v in deis.items() if k in TheirDPM().config and k not in ("algorithm_type", "solver_type")})
    ours.set_timesteps(10), theirs.set_timesteps(10)
    compare_loops("DEIS config as DPM-Solver++", ours, make_set(TheirDPM, dict(theirs.config), 10), torch.randn(1, 3, 4, 4))


@settings(max_examples=15)
@given(config=dpm_configs())
def test_every_config_diffusers_writes_loads(config):
    theirs = TheirDPM(**config)
    ours = DPMSolverMultistepScheduler.from_config(theirs.config)  # with diffusers' private and flow-matching keys
    for key, value in ours.config.items():
        expected = theirs.config[key]
        assert value == expected or (isinstance(value, float) and math.isnan(value) and math.isnan(expected)), key
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod) and torch.equal(ours.lambda_t, theirs.lambda_t)


def test_config_round_trips_through_both_libraries(tmp_path):
    ours = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_lu_lambdas=True, rescale_betas_zero_snr=True)
    theirs = TheirDPM.from_pretrained(ours.save_config(tmp_path).parent)
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    again = DPMSolverMultistepScheduler.from_config(dict(theirs.config))
    assert dict(again.config) == dict(ours.config)


UNKNOWN_VALUES = [("algorithm_type", "dpmsolver+++"), ("solver_type", "rk4"), ("solver_order", 4),
                  ("final_sigmas_type", "one"), ("variance_type", "learned_log"), ("prediction_type", "flow_prediction"),
                  ("beta_schedule", "sigmoid"), ("timestep_spacing", "karras")]


@pytest.mark.parametrize("key, value", UNKNOWN_VALUES)
def test_unknown_config_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        DPMSolverMultistepScheduler.from_config({"_class_name": "DPMSolverMultistepScheduler", key: value})


@pytest.mark.parametrize("key, value", [("use_flow_sigmas", True), ("flow_shift", 3.0), ("use_dynamic_shifting", True)])
def test_flow_matching_keys_are_refused_unless_at_their_default(key, value):
    with pytest.raises(ValueError, match=rf"sets {key}={value!r}, which pare does not implement"):
        DPMSolverMultistepScheduler.from_config({key: value})
    DPMSolverMultistepScheduler.from_config({key: TheirDPM().config[key]})  # the default loads


def test_sde_dpmsolver_third_order_is_refused():
    config = dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    theirs = TheirDPM(**config)
    theirs.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(UnboundLocalError):  # diffusers has no third-order sde-dpmsolver update
        for t in theirs.timesteps:
            x = theirs.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    with pytest.raises(ValueError, match="no third-order update"):
        DPMSolverMultistepScheduler(**config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(algorithm_type="dpmsolver"), "final_sigmas_type"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), "only one of"),
])
def test_invalid_combinations_raise_like_diffusers(kwargs, match):
    for cls in (DPMSolverMultistepScheduler, TheirDPM):
        with pytest.raises(ValueError, match=f"(?i){match}"):
            cls(**kwargs)


def test_constants_and_initial_state_match_diffusers():
    for config in ({}, dict(rescale_betas_zero_snr=True, beta_schedule="squaredcos_cap_v2")):
        ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
        assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
        for name in ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
            a, b = getattr(ours, name), getattr(theirs, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert ours.step_index is None and ours.begin_index is None and ours.model_outputs == [None, None]
    x = torch.randn(1, 2, 3, 3)
    assert ours.scale_model_input(x, 5) is x


# --- bad calls -----------------------------------------------------------------------------------


def test_bad_calls_raise():
    x = torch.zeros(1, 3, 4, 4)
    for cls in (DPMSolverMultistepScheduler, TheirDPM):
        with pytest.raises(ValueError, match="(?i)set_timesteps"):  # diffusers raises too
            cls().step(x, 999, x)
        with pytest.raises(ValueError, match="(?i)one of"):
            cls().set_timesteps(10, timesteps=[500, 100])
        with pytest.raises(ValueError, match="(?i)one of"):
            cls().set_timesteps()
    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):  # diffusers: silently the last step
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        scheduler.step(x, scheduler.timesteps[0], x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 4, 4\)"):
        scheduler.step(torch.zeros(1, 2, 4, 4), scheduler.timesteps[0], x)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        scheduler.step(x, t, x)
    with pytest.raises(ValueError, match="all 2 steps are done"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="mu=0.5"):
        scheduler.set_timesteps(10, mu=0.5)
    for n in (0, -1, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(n)


def test_return_dict_false_gives_a_one_tuple():
    ours = DPMSolverMultistepScheduler()
    ours.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4)
    out = ours.step(x, ours.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    assert np.isfinite(out[0].numpy()).all()


def test_lu_lambdas_with_another_sigma_spacing_is_refused():
    theirs = TheirDPM(use_lu_lambdas=True, use_karras_sigmas=True)  # diffusers: Karras silently wins
    theirs.set_timesteps(10)
    karras = TheirDPM(use_karras_sigmas=True)
    karras.set_timesteps(10)
    assert torch.equal(theirs.sigmas, karras.sigmas)
    with pytest.raises(ValueError, match="use_lu_lambdas=True cannot be combined"):
        DPMSolverMultistepScheduler(use_lu_lambdas=True, use_karras_sigmas=True)


def test_a_ddpm_config_with_a_fixed_variance_loads_and_samples_as_diffusers():
    """DDPM's variance_type='fixed_small' describes its training: diffusers' DPM-Solver reads it as no variance."""
    from diffusers import DDPMScheduler as TheirDDPM

    ddpm = {k: v for k, v in TheirDDPM(beta_schedule="scaled_linear", clip_sample=False).config.items() if not k.startswith("_")}
    assert ddpm["variance_type"] == "fixed_small"
    ours = DPMSolverMultistepScheduler.from_config(ddpm)
    kwargs = {k: v for k, v in ddpm.items() if k in TheirDPM().config}
    ours.set_timesteps(15)
    compare_loops("DDPM config loop", ours, make_set(TheirDPM, kwargs, 15), torch.randn(1, 4, 5, 5))


def test_a_repeated_first_timestep_starts_at_step_0_where_diffusers_skips_a_level():
    """The cosine schedule's Karras timesteps are not rounded but truncated: the first three are all 998.

    diffusers' second-match rule starts at step 1 and runs off the end of its sigmas; pare starts at 0,
    which is what diffusers does after set_begin_index(0) (its SDXL pipeline calls it, its SD pipeline does not).
    """
    config = dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(8), theirs.set_timesteps(8)
    assert ours.timesteps[0] == ours.timesteps[1] == 998
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(IndexError):
        y = x
        for t in theirs.timesteps:
            y = theirs.step(dummy_model(y, t), t, y).prev_sample
    compare_loops("repeated first timestep", ours, make_set(TheirDPM, config, 8, begin_index=0), x)
