"""pare.PNDMScheduler against diffusers.PNDMScheduler: timesteps, whole loops step by step, configs, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import PNDMScheduler as TheirPNDM
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, assert_parity
from pare.schedulers.scheduling_pndm import PNDMScheduler
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, seeds
from parity_tests.test_scheduling_ddim import SD21_DDIM_CONFIG
from parity_tests.test_scheduling_utils import STEP_FP32

# Stable Diffusion 1.5's scheduler/scheduler_config.json, as the Hub serves it.
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
PNDM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "set_alpha_to_one",
             "timestep_spacing", "steps_offset", "prediction_type")


@st.composite
def pndm_configs(draw, num_train_timesteps=st.one_of(st.just(1000), st.integers(100, 1000))):
    """DDIM's config strategy (every shared option) cut to PNDM's keys, plus skip_prk_steps."""
    ddim = draw(scheduler_configs("ddim", num_train_timesteps))
    config = {key: ddim[key] for key in PNDM_KEYS}
    config["prediction_type"] = draw(st.sampled_from(["epsilon", "v_prediction"]))
    config["skip_prk_steps"] = draw(st.booleans())
    return config


def set_both(ours, theirs, n):
    """set_timesteps on both; the timesteps to loop over, or None where pare refuses (and diffusers fails or overshoots)."""
    try:
        ours.set_timesteps(n)
    except ValueError as e:
        if "Runge-Kutta warm-up" in str(e):
            with pytest.raises(ValueError, match="could not be broadcast"):  # diffusers: a numpy error
                theirs.set_timesteps(n)
            event("n < 4 with the Runge-Kutta warm-up: pare raises")
        else:
            assert "past the last trained timestep" in str(e)
            theirs.set_timesteps(n)
            assert int(theirs.timesteps.max()) >= ours.config.num_train_timesteps
            event("leading spacing past T-1: pare raises")
        return None
    theirs.set_timesteps(n)
    expected = theirs.timesteps
    if len(expected) == len(ours.timesteps) + 1:
        # diffusers' trailing overshoot (see schedule.spaced_timesteps): one more timestep, -1, visited last
        assert ours.config.timestep_spacing == "trailing" and expected[-1] == -1
        event("diffusers' trailing overshoot")
        expected = expected[:-1]
    assert ours.timesteps.dtype == expected.dtype == torch.int64
    assert torch.equal(ours.timesteps, expected)
    return ours.timesteps


@settings(max_examples=40)
@given(config=pndm_configs(st.one_of(st.just(1000), st.integers(4, 1000))), data=st.data())
def test_pndm_timesteps_equal_diffusers(config, data):
    n = data.draw(st.integers(1, config["num_train_timesteps"]), label="num_inference_steps")
    ours, theirs = PNDMScheduler(**config), TheirPNDM(**config)
    timesteps = set_both(ours, theirs, n)
    if timesteps is not None:
        assert len(timesteps) == ((n + 1 if n > 1 else 1) if config["skip_prk_steps"] else n + 9)
        assert ours.num_inference_steps == theirs.num_inference_steps == n
        assert ours.prk_timesteps.tolist() == theirs.prk_timesteps.tolist()


@settings(max_examples=40)
@given(config=pndm_configs(), n=st.one_of(st.integers(1, 100), st.sampled_from([1, 2, 3, 4, 5, 25, 50, 99])),
       dtype_name=scheduler_dtypes, seed=seeds)
def test_pndm_loop_matches_diffusers_step_by_step(device, config, n, dtype_name, seed):
    """Every intermediate sample of a whole loop; fp32 to rel L2 1e-6, fp16/bf16 by the float64 error budget."""
    if n < 4 and not config["skip_prk_steps"]:  # too few for the warm-up (test_pndm_bad_calls_raise): PLMS instead
        config["skip_prk_steps"] = True
    event(f"skip_prk_steps={config['skip_prk_steps']}, {dtype_name}")
    ours = PNDMScheduler(**config)

    def make_theirs():
        theirs = TheirPNDM(**config)
        theirs.set_timesteps(n)
        return theirs

    timesteps = set_both(ours, TheirPNDM(**config), n)
    if timesteps is None:
        return
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    compare_loops(f"PNDM {n} steps", ours, make_theirs, x, timesteps=timesteps)
    assert len(ours.ets) == min(4, n)  # one eps per step (the Heun correction's is not kept), the last 4


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_trailing_overshoot_is_dropped_and_the_rest_matches(skip_prk_steps):
    """diffusers' trailing spacing gives 62 timesteps for 61 steps, the last -1 (alphas_cumprod[-1]); pare stops before it."""
    config = dict(timestep_spacing="trailing", skip_prk_steps=skip_prk_steps)
    ours, theirs = PNDMScheduler(**config), TheirPNDM(**config)
    ours.set_timesteps(61), theirs.set_timesteps(61)
    assert len(theirs.timesteps) == len(ours.timesteps) + 1 and theirs.timesteps[-1] == -1
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    compare_loops("PNDM trailing 61 steps", ours, lambda: theirs, x)


def test_pndm_state_matches_diffusers_after_every_step():
    """ets, counter and the kept sample: the multistep state diffusers keeps, step by step."""
    for skip in (False, True):
        ours, theirs = PNDMScheduler(skip_prk_steps=skip), TheirPNDM(skip_prk_steps=skip)
        ours.set_timesteps(6), theirs.set_timesteps(6)
        x = torch.randn(1, 2, 3, 3)
        for t in ours.timesteps:
            e = torch.tanh(x) * (1 + float(t) / 1000)
            x = ours.step(e, t, x).prev_sample
            theirs.step(e, t, x.clone())
            assert ours.counter == theirs.counter and len(ours.ets) == len(theirs.ets)
            for a, b in zip(ours.ets, theirs.ets):
                assert torch.equal(a, b)
            assert (ours.cur_sample is None) == (theirs.cur_sample is None)


def test_sd15_scheduler_config_loads_and_samples_as_diffusers(tmp_path, caplog):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SD15_PNDM_CONFIG))
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert "clip_sample" in caplog.text  # a key PNDM does not read: ignored, with a warning (diffusers: the same)
    theirs = TheirPNDM.from_pretrained(tmp_path, subfolder="scheduler")
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    assert ours.config.skip_prk_steps and ours.config.steps_offset == 1
    assert ours.final_alpha_cumprod == theirs.final_alpha_cumprod == ours.alphas_cumprod[0]

    ours.set_timesteps(50), theirs.set_timesteps(50)
    assert ours.timesteps[:4].tolist() == [981, 961, 961, 941]  # leading + steps_offset, the 2nd visited twice
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    compare_loops("SD1.5 PNDM 50 steps", ours, lambda: theirs, x)


def test_pndm_loads_a_config_written_for_another_class(caplog):
    """SD2.1's DDIM config file into PNDM: DDIM-only keys are ignored with a warning, as diffusers ignores them."""
    with caplog.at_level(logging.WARNING, logger="pare"):
        ours = PNDMScheduler.from_config(SD21_DDIM_CONFIG)
    for key in ("clip_sample", "a_key_no_library_knows"):
        assert key in caplog.text
    theirs = TheirPNDM.from_config(SD21_DDIM_CONFIG)
    assert all(theirs.config[k] == v for k, v in ours.config.items())
    assert ours.config.prediction_type == "v_prediction" and ours.config.skip_prk_steps
    ours.set_timesteps(20), theirs.set_timesteps(20)
    assert torch.equal(ours.timesteps, theirs.timesteps)


@pytest.mark.parametrize("key, value", [("prediction_type", "sample"), ("beta_schedule", "sigmoid"),
                                        ("timestep_spacing", "karras")])
def test_pndm_refuses_unknown_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"PNDMScheduler: {key}='{value}' is not supported; expected one of \("):
        PNDMScheduler.from_config({"_class_name": "PNDMScheduler", key: value})


def test_pndm_config_round_trips_through_diffusers(tmp_path):
    ours = PNDMScheduler.from_config(SD15_PNDM_CONFIG, timestep_spacing="linspace", prediction_type="v_prediction")
    theirs = TheirPNDM.from_pretrained(ours.save_config(tmp_path).parent)
    again = PNDMScheduler.from_config(dict(theirs.config))
    assert dict(again.config) == dict(ours.config)


def test_pndm_constants_and_forward_process_match_diffusers():
    ours, theirs = PNDMScheduler(beta_schedule="squaredcos_cap_v2"), TheirPNDM(beta_schedule="squaredcos_cap_v2")
    assert (ours.order, ours.init_noise_sigma, len(ours), ours.pndm_order) == (
        theirs.order, theirs.init_noise_sigma, len(theirs), theirs.pndm_order)
    assert ours.timesteps is None and theirs.timesteps is None
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    assert ours.scale_model_input(x, 5) is x
    assert_parity("PNDM add_noise", ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t), tolerance=STEP_FP32)


def test_pndm_return_dict_false_gives_a_one_tuple():
    ours = PNDMScheduler(skip_prk_steps=True)
    ours.set_timesteps(10)
    x = torch.randn(1, 2, 3, 3)
    out = ours.step(x, ours.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1


def test_pndm_bad_calls_raise():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        PNDMScheduler(skip_prk_steps=True).step(x, 999, x)
    with pytest.raises(ValueError, match=r"num_inference_steps=3 is too few .* skip_prk_steps=True"):
        PNDMScheduler().set_timesteps(3)
    for cls in (PNDMScheduler, TheirPNDM):  # PLMS before the warm-up: both refuse
        scheduler = cls()
        scheduler.set_timesteps(10)
        with pytest.raises(ValueError, match="(?i)runge-kutta|prk"):
            scheduler.step_plms(x, 900, x)
    scheduler = PNDMScheduler(skip_prk_steps=True)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 2, 2\) but sample \(1, 1, 2, 2\)"):
        scheduler.step(torch.zeros(1, 2, 2, 2), 900, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
