"""pare.schedulers.sigmas and the sigma-space schedulers built on it, against diffusers.

The helpers (Karras / exponential / beta sigmas, sigma_to_t) are compared bit for bit with diffusers'
methods; then, for each of the seven sigma schedulers (Euler, Euler a, Heun, KDPM2, KDPM2 a, LMS,
EDM Euler), over hypothesis-drawn configs and step counts 1..100: the schedule (timesteps, sigmas,
init_noise_sigma), whole sampling loops step by step (fp32 to rel L2 1e-6, fp64, fp16 / bf16 by the
error budget), img2img (set_begin_index + add_noise) and inpainting (add_noise mid-loop), configs
written for other classes, and the errors.

Also home of the strategy and the helpers that the per-scheduler test files share.
"""

from __future__ import annotations

import inspect
import logging
import sys
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers import (
    scheduling_edm_euler,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_k_dpm_2_ancestral_discrete,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pare.parity import DTYPES
from pare.schedulers import sigmas as S
from pare.schedulers.scheduling_edm_euler import EDMEulerScheduler
from pare.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler, get_ancestral_step
from pare.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from pare.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from pare.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from pare.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler
from pare.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from parity_tests.scheduler_loops import compare_loops
from parity_tests.strategies import scheduler_dtypes, seeds

# kind -> (pare class, diffusers class, the diffusers module whose randn_tensor draws the step noise, or None)
KINDS = {
    "euler": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, scheduling_euler_discrete),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler,
                        scheduling_euler_ancestral_discrete),
    "heun": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, None),
    "kdpm2": (KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler, None),
    "kdpm2_ancestral": (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler,
                        scheduling_k_dpm_2_ancestral_discrete),
    "lms": (LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, None),
    "edm_euler": (EDMEulerScheduler, diffusers.EDMEulerScheduler, scheduling_edm_euler),
}
SIGMA_FLAGS = (None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def their_keys(kind: str) -> set[str]:
    return set(inspect.signature(KINDS[kind][1].__init__).parameters) - {"self"}


@st.composite
def sigma_configs(draw, kind: str, num_train_timesteps=st.one_of(st.just(1000), st.integers(20, 1000))):
    """A diffusers config dict for the scheduler `kind` with every option it has drawn (diffusers' key names)."""
    ours, _, _ = KINDS[kind]
    keys = their_keys(kind)
    T = draw(num_train_timesteps)
    if kind.startswith("kdpm2"):
        # KDPM2's constructor walks all T levels through sigma_to_t (0.3 s at T = 1000, in both libraries): keep the
        # hypothesis examples small; the SD configs below run at T = 1000
        T = min(T, draw(st.integers(20, 250), label="kdpm2 T"))
    if kind == "edm_euler":
        return dict(
            num_train_timesteps=T,
            sigma_min=draw(st.floats(0.001, 0.05)),
            sigma_max=draw(st.one_of(st.just(80.0), st.floats(5.0, 120.0))),
            sigma_data=draw(st.floats(0.2, 1.0)),
            sigma_schedule=draw(st.sampled_from(["karras", "exponential"])),
            rho=draw(st.one_of(st.just(7.0), st.floats(2.0, 10.0))),
            prediction_type=draw(st.sampled_from(["epsilon", "v_prediction"])),
            final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
        )
    config = dict(
        num_train_timesteps=T,
        beta_start=draw(st.floats(1e-5, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(ours.beta_schedules)),
        trained_betas=None,
        prediction_type=draw(st.sampled_from(ours.prediction_types)),
        timestep_spacing=draw(st.sampled_from(["linspace", "leading", "trailing"])),
        steps_offset=draw(st.sampled_from([0, 0, 1, 2])),
    )
    if draw(st.integers(0, 5)) == 0:  # now and then a checkpoint's own betas
        low, high = draw(st.floats(1e-5, 1e-3)), draw(st.floats(5e-3, 3e-2))
        config["trained_betas"] = [low + (high - low) * (i / (T - 1)) ** 2 for i in range(T)]
    if "use_karras_sigmas" in keys:
        flag = draw(st.sampled_from(SIGMA_FLAGS))
        for name in SIGMA_FLAGS[1:]:
            config[name] = name == flag
    if "rescale_betas_zero_snr" in keys:
        config["rescale_betas_zero_snr"] = draw(st.booleans())
    if "clip_sample" in keys:
        config["clip_sample"] = draw(st.booleans())
        config["clip_sample_range"] = draw(st.floats(0.5, 3.0))
    if kind == "euler":
        config["interpolation_type"] = draw(st.sampled_from(["linear", "log_linear"]))
        config["timestep_type"] = draw(st.sampled_from(["discrete", "continuous"]))
        config["final_sigmas_type"] = draw(st.sampled_from(["zero", "sigma_min"]))
        if draw(st.booleans()):
            config["sigma_min"] = draw(st.floats(0.01, 0.2))
            config["sigma_max"] = draw(st.floats(2.0, 20.0))
    return config


@st.composite
def sigma_setups(draw, kind: str, max_steps: int = 100):
    """(config, num_inference_steps) with 1 <= num_inference_steps <= min(max_steps, num_train_timesteps)."""
    config = draw(sigma_configs(kind))
    return config, draw(st.integers(1, min(max_steps, config["num_train_timesteps"])), label="num_inference_steps")


def make_pair(kind: str, config: dict):
    ours, theirs, _ = KINDS[kind]
    return ours(**config), theirs(**config)


def overshoots(ours, theirs) -> bool:
    """True where diffusers' "trailing" spacing gave an extra timestep (see schedule.spaced_timesteps), which pare drops."""
    return len(theirs.timesteps) > len(ours.timesteps)


def assert_same_schedule(ours, theirs) -> int:
    """Identical timesteps (values and dtype), sigmas and init_noise_sigma; returns how many steps the loops may share.

    Where diffusers overshoots, every timestep pare has but the last is diffusers' (the last differs:
    pare steps to sigma = 0 there, diffusers to the extra level first).
    """
    assert ours.timesteps.dtype == theirs.timesteps.dtype, (ours.timesteps.dtype, theirs.timesteps.dtype)
    assert ours.sigmas.dtype == theirs.sigmas.dtype == torch.float32
    if overshoots(ours, theirs):
        assert ours.config.timestep_spacing == "trailing"
        event("diffusers' trailing overshoot")
        shared = len(ours.timesteps) - 1
        assert torch.equal(ours.timesteps[:shared], theirs.timesteps[:shared])
        return shared
    nan_step = diffusers_nan_step(theirs)
    if nan_step is not None:
        event("diffusers' sigma_down is NaN: pare's is exact")
        assert torch.isfinite(ours.timesteps).all() and torch.isfinite(ours.sigmas).all()
        assert torch.equal(ours.timesteps[:nan_step + 1], theirs.timesteps[:nan_step + 1])
        return nan_step
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    assert ours.num_inference_steps == theirs.num_inference_steps
    return len(ours.timesteps)


def first_timestep_repeats(scheduler) -> bool:
    """True where the schedule's first timestep occurs again (levels above the trained range, Karras rounding):
    diffusers' lookup then starts the walk at the repeat; pare starts at 0, as diffusers does with set_begin_index(0)."""
    repeats = bool((scheduler.timesteps[1:] == scheduler.timesteps[0]).any())
    if repeats:
        event("first timestep repeats: diffusers compared with set_begin_index(0)")
    return repeats


def diffusers_nan_step(theirs) -> int | None:
    """The first step at which diffusers' ancestral sigma_down rounds to 0 or NaN (sqrt of a difference that cancels), or None.

    It happens when sigma_i >> sigma_{i+1} (the cosine schedule's sigma_max ~ 2e4 with few steps). pare uses
    the exact sigma_{i+1}^2 / sigma_i there (`get_ancestral_step`): the loops are compared up to that step.
    """
    if isinstance(theirs, diffusers.KDPM2AncestralDiscreteScheduler):
        nan = torch.isnan(theirs.timesteps).nonzero()
        return int(nan[0]) - 1 if len(nan) else None  # t_mid_i sits at 2i + 1; the step at 2i already uses it
    if isinstance(theirs, diffusers.EulerAncestralDiscreteScheduler):
        s_from, s_to = theirs.sigmas[:-1], theirs.sigmas[1:]
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        bad = ((s_to**2 - s_up**2 <= 0) & (s_to > 0)).nonzero()
        return int(bad[0]) if len(bad) else None
    return None


def step_kwargs_for(kind: str, data) -> dict:
    """The step options a caller may pass: churn for Euler / EDM, the LMS order."""
    if kind in ("euler", "edm_euler") and data.draw(st.booleans(), label="churn"):
        return dict(s_churn=data.draw(st.floats(0.0, 3.0), label="s_churn"),
                    s_tmin=data.draw(st.sampled_from([0.0, 0.5]), label="s_tmin"),
                    s_tmax=data.draw(st.sampled_from([float("inf"), 10.0]), label="s_tmax"),
                    s_noise=data.draw(st.floats(0.9, 1.1), label="s_noise"))
    if kind == "lms":
        return dict(order=data.draw(st.integers(1, 4), label="order"))
    return {}


def takes_generator(kind: str) -> bool:
    return "generator" in inspect.signature(KINDS[kind][1].step).parameters


# --- the helpers of sigmas.py, bit for bit ------------------------------------------------------------------

ranges = st.tuples(st.floats(1e-3, 0.5), st.floats(1.0, 200.0))


@settings(max_examples=30)
@given(sigma_range=ranges, n=st.integers(1, 100))
def test_karras_exponential_beta_sigmas_equal_diffusers_bit_for_bit(sigma_range, n):
    sigma_min, sigma_max = sigma_range
    theirs = diffusers.EulerDiscreteScheduler(sigma_min=sigma_min, sigma_max=sigma_max)
    in_sigmas = np.array([sigma_max, sigma_min])  # ignored: the config's range wins
    for ours, their_method in ((S.karras_sigmas, theirs._convert_to_karras),
                               (S.exponential_sigmas, theirs._convert_to_exponential),
                               (S.beta_sigmas, theirs._convert_to_beta)):
        a, b = ours(sigma_min, sigma_max, n), their_method(in_sigmas=in_sigmas, num_inference_steps=n)
        assert a.dtype == b.dtype == np.float64 and np.array_equal(a, b), ours.__name__
    karras = S.karras_sigmas(sigma_min, sigma_max, n)
    assert karras[0] == pytest.approx(sigma_max) and karras[-1] == pytest.approx(sigma_max if n == 1 else sigma_min)


@settings(max_examples=30)
@given(sigma=st.one_of(st.floats(0.0, 30.0), st.just(0.0), st.floats(1e-6, 1e-3)), kind=st.sampled_from(["f64", "f32", "torch"]))
def test_sigma_to_t_equals_diffusers_for_numpy_and_torch_inputs(sigma, kind):
    theirs = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear")  # every sigma scheduler copies its _sigma_to_t
    log_sigmas = np.log(S.train_sigmas(theirs.alphas_cumprod))
    if kind == "f64":
        value, logs = np.float64(sigma), log_sigmas
    elif kind == "f32":
        value, logs = np.float32(sigma), log_sigmas
    else:  # what KDPM2's midpoints pass: 0-dim torch tensors and torch log sigmas
        value, logs = torch.tensor(sigma, dtype=torch.float32), torch.from_numpy(log_sigmas)
    a, b = S.sigma_to_t(value, logs), theirs._sigma_to_t(value, logs)
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    assert bool(a == b), (a, b)


def test_check_sigma_options_allows_at_most_one():
    S.check_sigma_options("X", True, False, False)
    with pytest.raises(ValueError, match=r"only one of .*use_karras_sigmas.*\['use_karras_sigmas', 'use_beta_sigmas'\]"):
        S.check_sigma_options("X", True, False, True)
    for kind in ("euler", "heun", "kdpm2", "kdpm2_ancestral", "lms"):
        ours, theirs, _ = KINDS[kind]
        with pytest.raises(ValueError, match="only one of"):
            ours(use_karras_sigmas=True, use_exponential_sigmas=True)
        with pytest.raises(ValueError, match="Only one of"):  # diffusers, too
            theirs(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_beta_sigmas_without_scipy_raise_a_clear_import_error():
    with mock.patch.dict(sys.modules, {"scipy": None, "scipy.stats": None}):
        with pytest.raises(ImportError, match="needs scipy"):
            S.beta_sigmas(0.03, 14.6, 10)
        with pytest.raises(ImportError, match="use_beta_sigmas=True needs scipy"):
            EulerDiscreteScheduler(use_beta_sigmas=True)
        EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(10)  # everything else needs no scipy


def test_index_for_timestep_takes_the_second_of_duplicates_and_names_a_missing_timestep():
    ours, theirs = make_pair("heun", {})
    ours.set_timesteps(5), theirs.set_timesteps(5)
    for t in ours.timesteps.unique():
        assert ours.index_for_timestep(t) == theirs.index_for_timestep(t)
    assert ours.index_for_timestep(ours.timesteps[1]) == 2  # t_1 sits at 1 and 2: diffusers' rule picks 2
    with pytest.raises(ValueError, match=r"timestep 123.5 is not one of this scheduler's timesteps"):
        ours.index_for_timestep(123.5)
    with pytest.raises(IndexError):  # diffusers: an IndexError from an empty nonzero()
        theirs.index_for_timestep(123.5)


# --- the seven schedulers: schedules and whole loops ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=12)
@given(data=st.data())
def test_sigma_schedule_equals_diffusers(kind, data):
    config, n = data.draw(sigma_setups(kind), label="setup")
    ours, theirs = make_pair(kind, config)
    assert_same_schedule(ours, theirs)  # the one the constructor builds
    ours.set_timesteps(n), theirs.set_timesteps(n)
    assert_same_schedule(ours, theirs)
    assert ours.order == theirs.order and len(ours) == len(theirs)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=10)
@given(data=st.data(), dtype_name=scheduler_dtypes, seed=seeds)
def test_sigma_loop_matches_diffusers_step_by_step(kind, data, dtype_name, seed):
    """Every intermediate sample of a whole loop: fp32 within rel L2 1e-6, fp64 to the table, fp16 / bf16 by the budget."""
    config, n = data.draw(sigma_setups(kind), label="setup")
    step_kwargs = step_kwargs_for(kind, data)
    ours, theirs = make_pair(kind, config)
    ours.set_timesteps(n), theirs.set_timesteps(n)
    shared = assert_same_schedule(ours, theirs)
    dtype = DTYPES[dtype_name]
    if kind == "lms" and dtype == torch.float64:
        # pare's LMS coefficients are exact; diffusers' come from quad on a float32 integrand (~1e-7 off): float64
        # loops agree to ~1e-7, not to the table's 1e-10 (test_scheduling_lms_discrete checks them at 1e-6)
        event("lms in float64: see test_scheduling_lms_discrete")
        dtype = torch.float32
    x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * ours.init_noise_sigma).to(dtype)

    first_repeats = first_timestep_repeats(theirs)

    def make_theirs():
        scheduler = KINDS[kind][1](**config)
        scheduler.set_timesteps(n)
        if first_repeats:  # pare starts such a schedule at 0 (SigmaSchedulerMixin._init_step_index); so does this
            scheduler.set_begin_index(0)
        return scheduler

    compare_loops(f"{kind} {n} steps", ours, make_theirs, x, timesteps=ours.timesteps[:shared],
                  seed=seed + 1 if takes_generator(kind) else None, noise_module=KINDS[kind][2],
                  fields=("prev_sample", "pred_original_sample") if dtype == torch.float32 else ("prev_sample",),
                  **step_kwargs)


@pytest.mark.parametrize("kind", ["euler_ancestral", "kdpm2_ancestral"])
def test_ancestral_noise_from_one_seed_is_diffusers_noise(kind):
    """Same seed, same samples, bit for bit: the noise is drawn as diffusers draws it (also with a generator per image)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for generator in (lambda: torch.Generator().manual_seed(7), lambda: [torch.Generator().manual_seed(i) for i in (3, 4)]):
        samples = []
        for cls in KINDS[kind][:2]:
            scheduler = cls(**config)
            scheduler.set_timesteps(9)
            g, x = generator(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x, generator=g).prev_sample
            samples.append(x)
        assert torch.equal(*samples)
    other = KINDS[kind][0](**config)
    other.set_timesteps(9)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * other.init_noise_sigma
    g = torch.Generator().manual_seed(8)
    for t in other.timesteps:
        x = other.step(torch.tanh(other.scale_model_input(x, t)), t, x, generator=g).prev_sample
    assert not torch.equal(x, samples[0])  # the seed really matters


@pytest.mark.parametrize("kind", ["euler_ancestral", "kdpm2_ancestral"])
def test_ancestral_sigma_down_is_exact_where_diffusers_cancels_to_zero(kind):
    """The cosine schedule's sigma_max ~ 2e4 with 2 steps: diffusers' sqrt(sigma_to^2 - sigma_up^2) rounds to 0
    (KDPM2 a: its log-midpoint, and so its samples, are NaN); pare's is the exact sigma_to^2 / sigma_from."""
    ours, theirs = make_pair(kind, dict(beta_schedule="squaredcos_cap_v2"))
    ours.set_timesteps(2), theirs.set_timesteps(2)
    assert diffusers_nan_step(theirs) == 0
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    outs = []
    for scheduler in (ours, theirs):
        y, g = x, torch.Generator().manual_seed(1)
        for t in scheduler.timesteps:
            y = scheduler.step(torch.tanh(scheduler.scale_model_input(y, t)), t, y, generator=g).prev_sample
        outs.append(y)
    assert torch.isfinite(outs[0]).all()
    if kind == "kdpm2_ancestral":
        assert torch.isnan(outs[1]).all()
    levels = ours.sigmas.unique_consecutive()
    down, _ = get_ancestral_step(levels[0], levels[1])
    assert down > 0 and torch.allclose(down.double(), levels[1].double() ** 2 / levels[0].double(), rtol=1e-6)


# --- img2img and inpainting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=8)
@given(data=st.data(), strength=st.floats(0.05, 1.0), seed=seeds)
def test_img2img_begin_index_and_add_noise_match_diffusers(kind, data, strength, seed):
    """The SD img2img pipeline's recipe: skip to t_start * order, set_begin_index, add_noise at the first timestep, loop."""
    config, n = data.draw(sigma_setups(kind, max_steps=40), label="setup")
    ours, theirs = make_pair(kind, config)
    ours.set_timesteps(n), theirs.set_timesteps(n)
    shared = assert_same_schedule(ours, theirs)
    t_start = max(n - min(int(n * strength), n), 0)
    begin = t_start * ours.order
    if begin >= shared:
        event("strength too low: nothing to denoise")
        return
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(begin)
    assert ours.begin_index == theirs.begin_index == begin
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    first = ours.timesteps[begin:begin + 1].repeat(2)
    latents = ours.add_noise(x0, noise, first)
    assert torch.equal(latents, theirs.add_noise(x0, noise, first))

    def make_theirs():
        scheduler = KINDS[kind][1](**config)
        scheduler.set_timesteps(n)
        scheduler.set_begin_index(begin)
        return scheduler

    compare_loops(f"{kind} img2img from {begin}", ours, make_theirs, latents, timesteps=ours.timesteps[begin:shared],
                  seed=seed if takes_generator(kind) else None, noise_module=KINDS[kind][2])


@pytest.mark.parametrize("kind", list(KINDS))
def test_add_noise_before_during_and_without_begin_index_matches_diffusers(kind):
    """Training-style add_noise (timesteps looked up, duplicates by diffusers' rule), and inpainting's (the current step_index)."""
    ours, theirs = make_pair(kind, {})
    ours.set_timesteps(12), theirs.set_timesteps(12)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    timesteps = ours.timesteps[[0, 3, len(ours.timesteps) - 1]]
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    for scheduler in (ours, theirs):  # inpainting: begin_index set, then the loop runs a few steps
        scheduler.set_begin_index(0)
        x = x0.clone()
        for t in scheduler.timesteps[:3]:
            kwargs = {"generator": torch.Generator().manual_seed(1)} if takes_generator(kind) else {}
            x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x, **kwargs).prev_sample
    assert ours.step_index == theirs.step_index == 3
    later = ours.timesteps[[5, 5, 5]]  # ignored once stepping has begun: the level is the current step's
    assert torch.equal(ours.add_noise(x0, noise, later), theirs.add_noise(x0, noise, later))


# --- configs -------------------------------------------------------------------------------------------------

# Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDM config), as the Hub serves it, plus a key nobody knows.
SD15_SCHEDULER_CONFIG = {
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
    "a_key_no_library_knows": 42,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_configs_of_other_classes_load_like_diffusers_with_a_note(kind, caplog):
    """`Other.from_config(pipe.scheduler.config)`: SD1.5's PNDM config and every sibling's config, as diffusers loads them."""
    ours_cls, theirs_cls, _ = KINDS[kind]
    # Each sibling's config as its scheduler_config.json carries it (every key written out, as save_config writes it).
    # Not covered: diffusers' in-memory configs also list, in `_use_default_values`, the keys their file lacked, and
    # a class loading such a config uses its own defaults for those; pare's configs do not track that.
    sources = [SD15_SCHEDULER_CONFIG] + [{"_class_name": KINDS[other][1].__name__, **KINDS[other][0]().config}
                                         for other in KINDS if other != kind]
    for source in sources:
        caplog.clear()
        try:
            theirs = theirs_cls.from_config(source)
        except TypeError:  # EDM from Euler's config: sigma_min=None reaches diffusers' sigma formula
            with pytest.raises(ValueError, match="sigma_min must be a number, got None"):
                ours_cls.from_config(source)
            continue
        with caplog.at_level(logging.WARNING, logger="pare"):
            ours = ours_cls.from_config(source)
        ignored = {k for k in source if not k.startswith("_")} - their_keys(kind)
        if ignored:
            assert all(key in caplog.text for key in ignored), (ignored, caplog.text)
        for key, value in ours.config.items():
            assert theirs.config[key] == value, key
        ours.set_timesteps(7), theirs.set_timesteps(7)
        assert_same_schedule(ours, theirs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_round_trips_through_both_libraries(kind, tmp_path):
    ours = KINDS[kind][0]()
    ours.save_config(tmp_path)
    theirs = KINDS[kind][1].from_pretrained(tmp_path)
    again = KINDS[kind][0].from_pretrained(tmp_path)
    assert dict(again.config) == dict(ours.config)
    assert all(theirs.config[k] == v for k, v in ours.config.items())


UNKNOWN_VALUES = [(kind, key, "bogus") for kind in KINDS for key in ("prediction_type", "timestep_spacing", "beta_schedule")
                  if key in their_keys(kind)]
UNKNOWN_VALUES += [("euler", "interpolation_type", "cubic"), ("euler", "timestep_type", "ddim"),
                   ("euler", "final_sigmas_type", "one"), ("edm_euler", "sigma_schedule", "cosine"),
                   ("edm_euler", "final_sigmas_type", "one")]


@pytest.mark.parametrize("kind,key,value", UNKNOWN_VALUES)
def test_unknown_config_values_are_refused_naming_the_key(kind, key, value):
    with pytest.raises(ValueError, match=rf"{key}='{value}' is not supported; expected one of \("):
        KINDS[kind][0].from_config({key: value})


@pytest.mark.parametrize("kind", ["euler_ancestral", "kdpm2", "kdpm2_ancestral"])
def test_sample_prediction_is_refused_when_read_where_diffusers_fails_in_step(kind):
    with pytest.raises(ValueError, match=r"prediction_type='sample' is not supported"):
        KINDS[kind][0](prediction_type="sample")
    theirs = KINDS[kind][1](prediction_type="sample")
    theirs.set_timesteps(4)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="sample"):
        theirs.step(x, theirs.timesteps[0], x)


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["euler", "euler_ancestral", "edm_euler"])
def test_integer_timesteps_raise_like_diffusers(kind):
    ours, theirs = make_pair(kind, {})
    ours.set_timesteps(5), theirs.set_timesteps(5)
    x = torch.zeros(1, 1, 2, 2)
    for scheduler in (ours, theirs):
        with pytest.raises(ValueError, match="(?i)integer"):
            scheduler.step(x, 3, x)


@pytest.mark.parametrize("kind", ["heun", "kdpm2", "kdpm2_ancestral", "lms"])
def test_integer_timesteps_are_looked_up_like_diffusers(kind):
    config = dict(timestep_spacing="leading")  # integral timesteps
    ours, theirs = make_pair(kind, config)
    ours.set_timesteps(4), theirs.set_timesteps(4)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = int(ours.timesteps[0])
    kwargs = {"generator": torch.Generator().manual_seed(0)} if takes_generator(kind) else {}
    a = ours.step(torch.tanh(x), t, x, **kwargs).prev_sample
    kwargs = {"generator": torch.Generator().manual_seed(0)} if takes_generator(kind) else {}
    assert torch.equal(a, theirs.step(torch.tanh(x), t, x, **kwargs).prev_sample)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_step_input_raises(kind):
    ours = KINDS[kind][0]()
    x = torch.zeros(1, 1, 2, 2)
    if kind in ("euler", "euler_ancestral"):  # the others build a full-length schedule in __init__, as diffusers does
        with pytest.raises(ValueError, match=r"before set_timesteps\(\)"):
            ours.step(x, ours.timesteps[0], x)
    ours.set_timesteps(5)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 2, 2, 2\) but sample \(1, 1, 2, 2\)"):
        ours.step(torch.zeros(1, 2, 2, 2), ours.timesteps[0], x)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        ours.step(x, torch.tensor(0.123456), x)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            ours.set_timesteps(bad)


def test_get_velocity_points_to_ddpm():
    with pytest.raises(NotImplementedError, match="DDPMScheduler.get_velocity"):
        EulerDiscreteScheduler().get_velocity(torch.zeros(1), torch.zeros(1), torch.zeros(1))

