"""pare.schedulers.schedule and .scheduling_utils (shared by DDIM and DDPM) against diffusers.

Also home of the helpers that test_scheduling_ddim.py and test_scheduling_ddpm.py share:
`check_step` runs one step of both libraries on identical inputs and generator seeds,
`run_loop` a whole sampling loop on `dummy_model`.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TheirDDIM
from diffusers import DDPMScheduler as TheirDDPM
from diffusers.schedulers import scheduling_ddim as their_ddim_module
from diffusers.schedulers import scheduling_ddpm as their_ddpm_module
from diffusers.utils import torch_utils as their_torch_utils
from hypothesis import event, given, settings
from hypothesis import strategies as st

import pare
from pare.parity import DTYPES, Tolerance, assert_parity, dtype_name
from pare.schedulers import SCHEDULERS, get_scheduler_class, schedule
from parity_tests.strategies import scheduler_configs, scheduler_dtypes, seeds

PAIRS = {"ddim": (pare.DDIMScheduler, TheirDDIM), "ddpm": (pare.DDPMScheduler, TheirDDPM)}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The bar for one scheduler step in float32 (the table's block tolerance is 1e-5).
STEP_FP32 = Tolerance(rel_l2=1e-6)


# --- helpers shared by the scheduler tests --------------------------------------------------------


def make_pair(kind: str, config: dict):
    ours, theirs = PAIRS[kind]
    return ours(**config), theirs(**config)


@contextlib.contextmanager
def same_noise_in_float64(low_dtype: torch.dtype):
    """Make diffusers' float64 reference run draw the noise the low-precision run drew, upcast.

    `torch.randn` gives different numbers in float64 than in float16 for one seed, so without
    this the float64 reference would be a different sample, not a more exact one.
    """
    real = their_torch_utils.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return real(shape, generator=generator, device=device, dtype=low_dtype, layout=layout).to(dtype)

    with mock.patch.object(their_ddim_module, "randn_tensor", draw), mock.patch.object(their_ddpm_module, "randn_tensor", draw):
        yield


def _double(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def overflows_alike(name, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """True where diffusers' half-precision output overflowed and pare's overflowed in the same places.

    An epsilon-prediction step at alpha_bar_t ~ 1e-9 (cosine schedule, trailing spacing) divides
    by sqrt(alpha_bar_t) and exceeds float16's 65504 in both libraries: a property of the dtype.
    """
    if ours.dtype not in LOW_PRECISION or bool(torch.isfinite(theirs).all()):
        return False
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), f"{name}: pare and diffusers overflow differently"
    event(f"{dtype_name(ours.dtype)} overflow in both libraries")
    return True


def assert_outputs_match(name, ours, theirs, reference, dtype, scope="block", tolerance=None):
    """Compare prev_sample and pred_original_sample; float32 steps are held to STEP_FP32."""
    if tolerance is None and dtype == torch.float32 and scope == "block":
        tolerance = STEP_FP32
    references = reference if reference is not None else (None, None)
    for field, a, b, r in zip(("prev_sample", "pred_original_sample"), ours, theirs, references):
        if not overflows_alike(f"{name}.{field}", a, b):
            assert_parity(f"{name}.{field}", a, b, r, dtype=dtype, scope=scope, tolerance=tolerance)


def check_step(name, ours, theirs, model_output, timestep, sample, seed, tolerance=None, **kwargs):
    """One step of each library on identical inputs, each with a fresh generator of the same seed (None: none).

    `tolerance` replaces the default (STEP_FP32 in float32, the table otherwise) where both run in float32 or float64.
    """
    if sample.dtype in LOW_PRECISION:
        tolerance = None
    dtype = sample.dtype

    def generator():
        return None if seed is None else torch.Generator().manual_seed(seed)

    out_ours = ours.step(model_output, timestep, sample, generator=generator(), return_dict=False, **kwargs)
    out_theirs = theirs.step(model_output, timestep, sample, generator=generator(), return_dict=False, **kwargs)
    reference = None
    if dtype in LOW_PRECISION:
        with same_noise_in_float64(dtype):
            reference = theirs.step(model_output.double(), timestep, sample.double(), generator=generator(),
                                    return_dict=False, **{k: _double(v) for k, v in kwargs.items()})
    assert_outputs_match(name, out_ours, out_theirs, reference, dtype, tolerance=tolerance)
    return out_ours


def dummy_model(x: torch.Tensor, t, variance_type: str | None = None) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a UNet: the same function of (x_t, t) for both libraries."""
    s = float(t) / 1000.0
    out = 0.9 * torch.tanh(x) * math.cos(3 * s) + 0.2 * x * math.sin(3 * s)
    if variance_type == "learned":  # a variance: must be positive
        return torch.cat([out, 0.01 * torch.sigmoid(x)], dim=1)  # (B, C, ...) -> (B, 2C, ...)
    if variance_type == "learned_range":  # an interpolation weight v in [-1, 1]
        return torch.cat([out, torch.tanh(x)], dim=1)
    return out


def run_loop(scheduler, timesteps, x, seed, variance_type=None, **step_kwargs):
    """A sampling loop over `timesteps` (pipelines' loop, minus the UNet), one generator for all steps."""
    generator = torch.Generator().manual_seed(seed)
    for t in timesteps:
        model_output = dummy_model(scheduler.scale_model_input(x, t), t, variance_type)
        x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def diffusers_prev_sample(scheduler, model_output, t, sample, seed, kwargs):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return scheduler.step(model_output, t, sample, generator=generator, **kwargs).prev_sample


def set_both(ours, theirs, n, T):
    """set_timesteps on both; False where pare refuses (leading spacing past T-1), after checking diffusers overshoots."""
    theirs.set_timesteps(n)
    try:
        ours.set_timesteps(n)
    except ValueError as e:
        assert "past the last trained timestep" in str(e)
        assert int(theirs.timesteps.max()) >= T  # diffusers' schedule really does leave the trained range
        event("leading spacing past T-1: pare raises")
        return False
    return True


# --- schedule.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["cosine", "exp", "laplace"])
@pytest.mark.parametrize("n", [1, 2, 10, 1000])
def test_betas_for_alpha_bar_equal_diffusers(transform, n):
    ours = schedule.betas_for_alpha_bar(n, alpha_transform_type=transform)
    theirs = their_ddpm_module.betas_for_alpha_bar(n, alpha_transform_type=transform)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


@settings(max_examples=30)
@given(config=scheduler_configs("ddpm"))
def test_betas_and_alphas_cumprod_equal_diffusers(config):
    ours, theirs = make_pair("ddpm", config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype == torch.float32, name
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 999, 37])
def test_every_step_count_gives_diffusers_timesteps(spacing, T):
    """All n in 1..T: identical int64 timesteps, except where diffusers' trailing spacing appends a spurious -1."""
    ours, theirs = pare.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing), TheirDDIM(
        num_train_timesteps=T, timestep_spacing=spacing)
    extra = []
    for n in range(1, T + 1):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64 and len(ours.timesteps) == n
        if len(theirs.timesteps) == n + 1:
            # np.arange(T, 0, -T/n) overshoots by one float step; the extra entry indexes alphas_cumprod[-1].
            assert spacing == "trailing" and theirs.timesteps[-1] == -1, (n, theirs.timesteps[-3:])
            extra.append(n)
            assert torch.equal(ours.timesteps, theirs.timesteps[:n]), n
        else:
            assert torch.equal(ours.timesteps, theirs.timesteps), n
    if spacing == "trailing" and T == 1000:
        assert extra[:3] == [61, 103, 121]  # the divergence is real, and documented in spaced_timesteps


def test_leading_spacing_past_the_last_timestep_raises():
    ours, theirs = pare.DDIMScheduler(steps_offset=1), TheirDDIM(steps_offset=1)
    theirs.set_timesteps(1000)
    assert theirs.timesteps[0] == 1000  # diffusers builds it; its step() then fails with an IndexError
    with pytest.raises(IndexError):
        theirs.step(torch.zeros(1, 1, 2, 2), theirs.timesteps[0], torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="steps_offset=1 and num_inference_steps=1000 gives timestep 1000"):
        ours.set_timesteps(1000)


def test_rescale_zero_terminal_snr_equals_diffusers():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ours, theirs = schedule.rescale_zero_terminal_snr(betas), their_ddim_module.rescale_zero_terminal_snr(betas)
    assert torch.equal(ours, theirs)
    assert torch.cumprod(1 - ours, 0)[-1] == 0  # zero terminal SNR, exactly (Lin et al. Algorithm 1)


# --- scheduling_utils.py: forward process, registry, errors -------------------------------------


@settings(max_examples=20)
@given(kind=st.sampled_from(sorted(PAIRS)), config=st.data(), dtype_name=scheduler_dtypes, seed=seeds,
       batch=st.integers(1, 3))
def test_add_noise_and_get_velocity_match_diffusers(device, kind, config, dtype_name, seed, batch):
    config = config.draw(scheduler_configs(kind))
    dtype = DTYPES[dtype_name]
    ours, theirs = make_pair(kind, config)
    g = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(batch, 3, 4, 5, generator=g).to(device, dtype) for _ in range(2))
    timesteps = torch.randint(0, config["num_train_timesteps"], (batch,), generator=g).to(device)
    for method in ("add_noise", "get_velocity"):
        a = getattr(ours, method)(x0, noise, timesteps)
        b = getattr(theirs, method)(x0, noise, timesteps)
        ref = getattr(theirs, method)(x0.double(), noise.double(), timesteps) if dtype in LOW_PRECISION else None
        assert a.dtype == dtype
        assert_parity(f"{kind}.{method}", a, b, ref, dtype=dtype, tolerance=STEP_FP32 if dtype == torch.float32 else None)


def test_add_noise_rejects_negative_timesteps():
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\], got \[-1\]"):
        pare.DDPMScheduler().add_noise(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([-1]))


def test_scheduler_registry_resolves_class_names():
    assert get_scheduler_class("DDIMScheduler") is pare.DDIMScheduler
    assert get_scheduler_class("DDPMScheduler") is pare.DDPMScheduler
    # Every registered name is covered by test_pipeline_schedulers.py; a name pare has not is refused, listing them.
    with pytest.raises(ValueError, match=r"'DPMSolverSDEScheduler' is not implemented .*\['DDIMScheduler', 'DDPMScheduler'"):
        get_scheduler_class("DPMSolverSDEScheduler")
    assert {"DDIMScheduler", "DDPMScheduler"} <= set(SCHEDULERS)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_scheduler_constants_match_diffusers(kind):
    ours, theirs = make_pair(kind, {})
    assert (ours.order, ours.init_noise_sigma, len(ours)) == (theirs.order, theirs.init_noise_sigma, len(theirs))
    assert torch.equal(ours.timesteps, theirs.timesteps)  # before set_timesteps: the full chain T-1 .. 0
    x = torch.randn(1, 2, 3, 3)
    assert ours.scale_model_input(x, 5) is x


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("key, value", [("beta_schedule", "cosine"), ("prediction_type", "x0"),
                                        ("timestep_spacing", "karras")])
def test_unknown_config_values_name_the_choices(kind, key, value):
    cls = PAIRS[kind][0]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {key}='{value}' is not supported; expected one of \("):
        cls(**{key: value})
    with pytest.raises(ValueError, match=f"{key}='{value}'"):
        cls.from_config({"_class_name": cls.__name__, key: value})


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, True])
def test_bad_num_inference_steps_raise_value_error(kind, n):
    ours, theirs = make_pair(kind, {})
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(n)
    if n == 1001:  # the one case diffusers checks, with the same exception type
        with pytest.raises(ValueError, match="cannot be larger"):
            theirs.set_timesteps(n)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_trained_betas_of_the_wrong_length_raise(kind):
    with pytest.raises(ValueError, match="trained_betas has 3 values but num_train_timesteps=1000"):
        PAIRS[kind][0](trained_betas=[1e-4, 2e-4, 3e-4])


def test_trained_betas_accept_numpy_arrays_and_save_as_json(tmp_path):
    betas = np.linspace(1e-4, 0.02, 1000)
    ours = pare.DDPMScheduler(trained_betas=betas)
    assert torch.equal(ours.alphas_cumprod, TheirDDPM(trained_betas=betas).alphas_cumprod)
    assert ours.config.trained_betas == betas.tolist()
    again = pare.DDPMScheduler.from_config(ours.save_config(tmp_path))
    assert torch.equal(again.alphas_cumprod, ours.alphas_cumprod)
