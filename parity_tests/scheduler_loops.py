"""Whole sampling loops of a pare scheduler and its diffusers twin, compared step by step.

Shared by the multistep scheduler tests (PNDM, LCM, UniPC, DEIS). Every intermediate sample is
compared: in float32 to rel L2 1e-6 (`STEP_FP32`), in float64 to the table's float64 bound, and
in float16 / bfloat16 by the error budget against diffusers' own loop run in float64 on the
upcast input (drawing the same noise, upcast: `same_noise_in_float64`).
"""

from __future__ import annotations

import contextlib
from typing import Callable
from unittest import mock

import torch
from hypothesis import event
from hypothesis.errors import InvalidArgument

from pare.parity import assert_parity
from parity_tests.test_scheduling_utils import LOW_PRECISION, STEP_FP32, dummy_model, overflows_alike


def note(text: str) -> None:
    """hypothesis' `event` inside a hypothesis test; nothing in a plain one."""
    try:
        event(text)
    except InvalidArgument:
        pass


@contextlib.contextmanager
def same_noise_in_float64(module, low_dtype: torch.dtype):
    """Make `module.randn_tensor` (a diffusers scheduler module) draw in `low_dtype`, then upcast."""
    if module is None:
        yield
        return
    real = module.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return real(shape, generator=generator, device=device, dtype=low_dtype, layout=layout).to(dtype)

    with mock.patch.object(module, "randn_tensor", draw):
        yield


def compare_loops(
    name: str,
    ours,
    make_theirs: Callable[[], object],
    x: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    seed: int | None = None,
    noise_module=None,
    fields: tuple[str, ...] = ("prev_sample",),
    check_state: Callable | None = None,
    **step_kwargs,
):
    """Run `ours` and a fresh `make_theirs()` (both already set up) over `timesteps` (default: ours), comparing each step.

    `seed`: each library gets its own generator of that seed for the whole loop (None: no generator argument).
    `fields`: names of the `return_dict=False` tuple entries to compare. `check_state(ours, theirs)` runs after
    every step (the multistep state). Returns (pare's last sample, diffusers' last sample, diffusers' scheduler).
    """
    theirs = make_theirs()
    timesteps = ours.timesteps if timesteps is None else timesteps
    dtype = x.dtype
    reference = make_theirs() if dtype in LOW_PRECISION else None
    tolerance = STEP_FP32 if dtype == torch.float32 else None

    def generator():
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    g_ours, g_theirs, g_ref = generator(), generator(), generator()
    x_ours, x_theirs, x_ref = x, x, x.double()
    for i, t in enumerate(timesteps):
        out_ours = ours.step(dummy_model(ours.scale_model_input(x_ours, t), t), t, x_ours,
                             return_dict=False, **g_ours, **step_kwargs)
        out_theirs = theirs.step(dummy_model(theirs.scale_model_input(x_theirs, t), t), t, x_theirs,
                                 return_dict=False, **g_theirs, **step_kwargs)
        assert len(out_ours) == len(out_theirs), f"{name}: step returns {len(out_ours)} values, diffusers {len(out_theirs)}"
        out_ref = (None,) * len(out_ours)
        if reference is not None:
            with same_noise_in_float64(noise_module, dtype):
                out_ref = reference.step(dummy_model(reference.scale_model_input(x_ref, t), t), t, x_ref,
                                         return_dict=False, **g_ref, **step_kwargs)
        for k, field in enumerate(fields):
            a, b, r = out_ours[k], out_theirs[k], out_ref[k]
            assert a.dtype == dtype, f"{name}: step {i} returns {a.dtype} for a {dtype} sample"
            label = f"{name}, step {i} of {len(timesteps)} (t={float(t):g}), {field}"
            if overflows_alike(label, a, b):
                return out_ours[0], out_theirs[0], theirs
            assert_parity(label, a, b, r, dtype=dtype, tolerance=tolerance)
        if check_state is not None:
            check_state(ours, theirs)
        x_ours, x_theirs, x_ref = out_ours[0], out_theirs[0], out_ref[0]
    return x_ours, x_theirs, theirs
