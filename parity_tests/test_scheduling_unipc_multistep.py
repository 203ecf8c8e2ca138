"""pare.UniPCMultistepScheduler against diffusers': timesteps and sigmas, whole loops step by step, state, configs, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import UniPCMultistepScheduler as TheirUniPC
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES, Tolerance, assert_parity
from pare.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from parity_tests.scheduler_loops import compare_loops, note
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, seeds
from parity_tests.test_scheduling_pndm import SD15_PNDM_CONFIG
from parity_tests.test_scheduling_utils import STEP_FP32, dummy_model

SHARED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
               "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "steps_offset",
               "rescale_betas_zero_snr")
SIGMA_SPACINGS = (None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@st.composite
def solver_configs(draw, keys=SHARED_KEYS, num_train_timesteps=st.one_of(st.just(1000), st.integers(200, 1000))):
    """DDIM's config strategy (every shared option) cut to `keys`, plus the sigma spacings (one at most)."""
    ddim = draw(scheduler_configs("ddim", num_train_timesteps))
    config = {key: ddim[key] for key in keys}
    spacing = draw(st.sampled_from(SIGMA_SPACINGS))
    if spacing is not None:
        config[spacing] = True
    return config


@st.composite
def unipc_configs(draw, **kwargs):
    config = draw(solver_configs(**kwargs))
    config.update(
        solver_order=draw(st.sampled_from([1, 2, 2, 3, 4])),
        predict_x0=draw(st.booleans()),
        solver_type=draw(st.sampled_from(["bh1", "bh2"])),
        lower_order_final=draw(st.booleans()),
        disable_corrector=draw(st.lists(st.integers(0, 6), max_size=3, unique=True)),
        final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
    )
    if draw(st.integers(0, 3)) == 0:  # the range of the Karras / exponential / beta levels (unused without them)
        config["sigma_min"], config["sigma_max"] = draw(st.floats(0.01, 0.5)), draw(st.floats(5.0, 20.0))
    return config


def make_valid(config: dict) -> dict:
    """The configs pare refuses (test_unipc_refuses_configs_that_cannot_reach_sigma_zero), moved to sigma_min."""
    if config["final_sigmas_type"] == "zero" and (
            not config["predict_x0"] or (not config["lower_order_final"] and config["solver_order"] >= 2)):
        note("cannot reach sigma = 0: final_sigmas_type='sigma_min' instead")
        config["final_sigmas_type"] = "sigma_min"
    return config


def set_both(ours, theirs, n):
    """set_timesteps on both: the timesteps both visit alike (pare's), or None where pare refuses."""
    theirs.set_timesteps(n)
    try:
        ours.set_timesteps(n)
    except ValueError as e:
        assert "past the last trained timestep" in str(e) or "repeats timesteps" in str(e), str(e)
        note("pare refuses the spacing")
        return None
    expected = theirs.timesteps
    if len(expected) == len(ours.timesteps) + 1:
        # diffusers' trailing overshoot: one more timestep, -1, and one more sigma
        assert ours.config.timestep_spacing == "trailing" and expected[-1] == -1
        note("diffusers' trailing overshoot")
        assert torch.equal(ours.timesteps, expected[:-1])
        assert torch.equal(ours.sigmas[:-1], theirs.sigmas[:-2]) and ours.sigmas[-1] == theirs.sigmas[-1]
        return ours.timesteps
    assert ours.timesteps.dtype == expected.dtype == torch.int64
    assert torch.equal(ours.timesteps, expected), (ours.timesteps, expected)
    assert ours.sigmas.dtype == theirs.sigmas.dtype == torch.float32
    assert torch.equal(ours.sigmas, theirs.sigmas)
    return ours.timesteps


@settings(max_examples=40)
@given(config=unipc_configs(), data=st.data())
def test_unipc_timesteps_and_sigmas_equal_diffusers(config, data):
    config = make_valid(config)
    n = data.draw(st.one_of(st.integers(1, 100), st.integers(1, config["num_train_timesteps"])), label="n")
    set_both(UniPCMultistepScheduler(**config), TheirUniPC(**config), n)


def state_matches(ours, theirs):
    """The corrector's last sample, the order and the output history, after every step."""
    assert ours.this_order == theirs.this_order and ours.lower_order_nums == theirs.lower_order_nums
    assert ours.step_index == theirs.step_index
    assert (ours.last_sample is None) == (theirs.last_sample is None)
    if ours.last_sample is not None and torch.isfinite(theirs.last_sample).all():
        tolerance = STEP_FP32 if ours.last_sample.dtype == torch.float32 else Tolerance(rel_l2=1e-2)
        assert_parity("last_sample", ours.last_sample, theirs.last_sample, tolerance=tolerance)


def run_both(name, config, n, x, timesteps, ours, make_theirs):
    """compare_loops, with the cases where the two loops cannot simply run to the end alike (see the class doc)."""
    if len(make_theirs().timesteps) == len(timesteps) + 1:
        # trailing overshoot: the orders differ once diffusers counts one step more, and pare's last step ends at
        # the final sigma where diffusers' ends at the extra timestep's; before that, all alike
        timesteps = timesteps[: max(min(len(timesteps) - config["solver_order"] + 1, len(timesteps) - 1), 0)]
        note("trailing overshoot: the steps before the orders differ")
    full = len(timesteps) == len(ours.timesteps)
    zero_length_last = full and bool(ours.sigmas[-1] == ours.sigmas[-2])  # sigma_min repeated: h = 0
    bh1_at_zero = full and config["solver_type"] == "bh1" and config["final_sigmas_type"] == "zero"
    if not (zero_length_last or bh1_at_zero):
        compare_loops(name, ours, make_theirs, x, timesteps=timesteps, check_state=state_matches)
        return
    x_ours, x_theirs, theirs = compare_loops(name, ours, make_theirs, x, timesteps=timesteps[:-1],
                                             check_state=state_matches)
    t = timesteps[-1]
    last = ours.step(dummy_model(x_ours, t), t, x_ours).prev_sample
    try:
        theirs_last = theirs.step(dummy_model(x_theirs, t), t, x_theirs).prev_sample
    except torch.linalg.LinAlgError:  # on CUDA, where the CPU's solve returns NaN (h = 0: R's rows are inf)
        assert zero_length_last and theirs.this_order >= 3
        theirs_last = torch.full_like(x_theirs, float("nan"))
    tolerance = STEP_FP32 if x.dtype == torch.float32 else Tolerance(rel_l2=1e-2)
    if zero_length_last:  # x_t = x_s (the corrected sample); diffusers: the same, or NaN (or, on CUDA, a
        assert torch.equal(last, ours.last_sample)  # singular solve) at orders >= 3
        if torch.isfinite(theirs_last).all():
            assert_parity(f"{name}: zero-length last step", last, theirs_last, tolerance=tolerance)
        else:
            assert theirs.this_order >= 3
            note("diffusers' NaN at a zero-length step")
    else:  # diffusers: NaN (B(h) * 0 = -inf * 0); pare: the first-order step, which is the predicted x_0
        assert not torch.isfinite(theirs_last).all(), "diffusers' bh1 last step is finite now: compare with it instead"
        note("diffusers' bh1 NaN at sigma = 0")
        assert_parity(f"{name}: last step = predicted x_0", last, theirs.model_outputs[-1], tolerance=tolerance)


# diffusers moves UniPC's float32 sigmas to the sample's device before its log and expm1 (the `.to(device)` of its
# multistep_uni_p_bh_update; its other schedulers keep them on the CPU); pare keeps that scalar work on the CPU for
# every device, where it needs no launch and no sync. On CUDA the two libraries' float32 coefficients then differ by
# an ulp of CUDA's libm against the CPU's, and the noise-prediction update (predict_x0=False) at a large sigma
# cancels two terms each many times the result, so that ulp grows: on an H100 a float64 loop differed by 4e-9 (rel
# L2, against the table's 1e-12) and a float32 one with zero-SNR Karras sigmas by 4.3e-6 (against 1e-6). The
# property test below is therefore the CPU's, where both libraries compute alike; the CUDA tier runs SD's configs.
ON_CPU_ONLY = ("UniPC's coefficients are float32 from CUDA's libm in diffusers and the CPU's in pare: an ulp apart, "
               "amplified by ill-conditioned steps (see the comment above); the CUDA tier runs SD's configs")


@settings(max_examples=40)
@given(config=unipc_configs(), n=st.one_of(st.integers(1, 100), st.sampled_from([1, 2, 3, 5, 8, 25])),
       dtype_name=scheduler_dtypes, seed=seeds)
def test_unipc_loop_matches_diffusers_step_by_step(device, config, n, dtype_name, seed):
    """Every intermediate sample (after corrector and predictor) and the corrector's state, over every option."""
    if device.type != "cpu":
        pytest.skip(ON_CPU_ONLY)
    config = make_valid(config)
    ours = UniPCMultistepScheduler(**config)
    timesteps = set_both(ours, TheirUniPC(**config), n)
    if timesteps is None:
        return
    begin = len(timesteps) > 1 and timesteps[0] == timesteps[1]  # see the class doc: a repeated first timestep
    if begin:
        event("repeated first timestep: set_begin_index(0)")
        ours.set_begin_index(0)

    def make_theirs():
        theirs = TheirUniPC(**config)
        theirs.set_timesteps(n)
        if begin:
            theirs.set_begin_index(0)
        return theirs

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device, DTYPES[dtype_name])
    run_both(f"UniPC {n} steps", config, n, x, timesteps, ours, make_theirs)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_unipc_sd_loops_match_diffusers(device, solver_type, solver_order):
    """SD's betas, 20 steps, with and without the corrector at the first steps (on the --device too)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_type=solver_type,
                  solver_order=solver_order, disable_corrector=[0, 1])
    for n in (4, 20):
        ours = UniPCMultistepScheduler(**config)
        ours.set_timesteps(n)

        def make_theirs():
            theirs = TheirUniPC(**config)
            theirs.set_timesteps(n)
            return theirs

        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(n)).to(device)
        run_both(f"UniPC SD {solver_type} order {solver_order}", dict(config, final_sigmas_type="zero"), n, x,
                 ours.timesteps, ours, make_theirs)


def test_unipc_img2img_start_matches_diffusers():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, theirs = UniPCMultistepScheduler(use_karras_sigmas=True), TheirUniPC(use_karras_sigmas=True)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    t = ours.timesteps[4:5].repeat(2)
    # begin_index unset: the level is found from the timestep
    assert_parity("UniPC add_noise", ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)
    ours.set_begin_index(4), theirs.set_begin_index(4)
    latents = ours.add_noise(x0, noise, t)
    assert_parity("UniPC add_noise at begin_index", latents, theirs.add_noise(x0, noise, t), tolerance=STEP_FP32)
    compare_loops("UniPC from begin_index 4", ours, lambda: theirs, latents, timesteps=ours.timesteps[4:],
                  check_state=state_matches)


def test_unipc_loads_other_configs_as_diffusers(caplog):
    """A DPM-Solver config (solver_type='midpoint' reads as bh2) and SD1.5's PNDM config: ignored keys logged."""
    from diffusers import DPMSolverMultistepScheduler as TheirDPM

    dpm = {**dict(TheirDPM(beta_schedule="scaled_linear", use_karras_sigmas=True).config), "_use_default_values": []}
    for written, ignored in ((dpm, "algorithm_type"), (SD15_PNDM_CONFIG, "skip_prk_steps")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pare"):
            ours = UniPCMultistepScheduler.from_config(written)
        assert ignored in caplog.text
        theirs = TheirUniPC.from_config(written)
        assert all(theirs.config[k] == v for k, v in ours.config.items()), {
            k: (v, theirs.config[k]) for k, v in ours.config.items() if theirs.config[k] != v}
        ours.set_timesteps(12), theirs.set_timesteps(12)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
        assert ours.config.solver_type == theirs.config.solver_type == "bh2"
        if written is dpm:
            assert "reading solver_type='midpoint'" in caplog.text


@pytest.mark.parametrize("key, value", [("solver_type", "bh3"), ("final_sigmas_type", "sigma_max"),
                                        ("prediction_type", "flow_prediction"), ("beta_schedule", "sigmoid"),
                                        ("timestep_spacing", "karras")])
def test_unipc_refuses_unknown_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"UniPCMultistepScheduler: {key}='{value}' is not supported; expected one of \("):
        UniPCMultistepScheduler.from_config({"_class_name": "UniPCMultistepScheduler", key: value})


@pytest.mark.parametrize("key, value", [("use_flow_sigmas", True), ("flow_shift", 3.0), ("solver_p", "DDIM")])
def test_unipc_refuses_flow_matching_and_solver_p(key, value):
    with pytest.raises(ValueError, match=rf"sets {key}={value!r}, which pare does not implement"):
        UniPCMultistepScheduler.from_config({key: value})
    UniPCMultistepScheduler.from_config({key: UniPCMultistepScheduler.unsupported_config[key]})  # the default loads


def test_unipc_refuses_configs_that_cannot_reach_sigma_zero():
    x = torch.randn(1, 2, 4, 4)
    for bad, match in ((dict(predict_x0=False), "predict_x0=False cannot step to sigma = 0"),
                       (dict(lower_order_final=False, solver_order=3), "lower_order_final=False with solver_order=3")):
        with pytest.raises(ValueError, match=match):
            UniPCMultistepScheduler(**bad)
        theirs = TheirUniPC(**bad)  # diffusers: NaN or a singular matrix at the last step
        theirs.set_timesteps(5)
        sample = x
        try:
            for t in theirs.timesteps:
                sample = theirs.step(dummy_model(sample, t), t, sample).prev_sample
            assert not torch.isfinite(sample).all()
        except torch.linalg.LinAlgError:
            pass
        UniPCMultistepScheduler(**bad, final_sigmas_type="sigma_min")  # the fix the message names


def test_unipc_config_round_trips_through_diffusers(tmp_path):
    ours = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", disable_corrector=[0, 2], use_karras_sigmas=True)
    theirs = TheirUniPC.from_pretrained(ours.save_config(tmp_path).parent)
    assert dict(UniPCMultistepScheduler.from_config(dict(theirs.config)).config) == dict(ours.config)
    assert dict(UniPCMultistepScheduler.from_pretrained(tmp_path).config) == dict(ours.config)


def test_unipc_constants_match_diffusers():
    ours, theirs = UniPCMultistepScheduler(), TheirUniPC()
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.step_index is None and ours.begin_index is None and ours.last_sample is None
    x = torch.randn(1, 2, 3, 3)
    assert ours.scale_model_input(x, 5) is x


def test_unipc_bad_calls_raise():
    x = torch.zeros(1, 1, 2, 2)
    scheduler = UniPCMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="flow-matching"):
        scheduler.set_timesteps(10, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="repeats timesteps"):
        scheduler.set_timesteps(1000)
    with pytest.raises(ValueError, match="only one of"):
        UniPCMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="solver_order must be a positive int"):
        UniPCMultistepScheduler(solver_order=0)
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
def test_unipc_trailing_overshoot_is_dropped(solver_order):
    """diffusers' trailing spacing visits 62 timesteps for 61 steps (the last -1); pare's 61 match it until the orders differ."""
    config = dict(timestep_spacing="trailing", solver_order=solver_order, final_sigmas_type="zero", solver_type="bh2")
    ours = UniPCMultistepScheduler(**config)
    timesteps = set_both(ours, TheirUniPC(**config), 61)
    assert len(timesteps) == 61

    def make_theirs():
        theirs = TheirUniPC(**config)
        theirs.set_timesteps(61)
        return theirs

    assert len(make_theirs().timesteps) == 62
    run_both("UniPC trailing 61", config, 61, torch.randn(1, 2, 4, 4), timesteps, ours, make_theirs)
    assert ours.step_index == min(61 - solver_order + 1, 60)
