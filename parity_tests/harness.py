"""Running one block of pare beside its diffusers twin on identical weights and inputs."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import torch

from pare.parity import Comparison, assert_parity


def cast(value: Any, dtype: torch.dtype, device: torch.device | str) -> Any:
    """Move floating tensors (also inside lists, tuples and dicts) to dtype and device; others only to device."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(cast(v, dtype, device) for v in value)
    if isinstance(value, dict):
        return {k: cast(v, dtype, device) for k, v in value.items()}
    return value


def first_tensor(out: Any) -> torch.Tensor:
    """diffusers blocks return tensors, tuples or output dataclasses; take the main tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}")


FAST = False  # set from pytest's --fast (conftest.py): pare's side runs pare.fast.optimize_model


def fast_if_asked(module: torch.nn.Module) -> torch.nn.Module:
    """pare's module on its fast path when the run asked for --fast (after its weights and dtype are final)."""
    if FAST:
        from pare.fast import optimize_model

        optimize_model(module)
    return module


def copy_weights(pare_module: torch.nn.Module, diffusers_module: torch.nn.Module) -> None:
    """diffusers' state dict into pare's twin, strictly: the parameter names must be identical."""
    pare_module.load_state_dict(diffusers_module.state_dict(), strict=True)


@torch.no_grad()
def check_block(
    name: str,
    pare_module: torch.nn.Module,
    diffusers_module: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scope: str = "block",
    pare_kwargs: dict | None = None,
    output: Callable[[Any], torch.Tensor] = first_tensor,
) -> Comparison:
    """Copy diffusers' weights into pare, run both in `dtype` on `device`, compare.

    Below float32 the diffusers block also runs in float64 on the same (rounded, upcast)
    weights and inputs, and pare is judged by the error budget of `pare.parity.tolerances`.
    `pare_kwargs` are extra keyword arguments for pare only, where the two APIs differ on purpose.
    """
    kwargs = kwargs or {}
    copy_weights(pare_module, diffusers_module)
    pare_module = fast_if_asked(pare_module.to(device=device, dtype=dtype).eval())
    diffusers_module = diffusers_module.to(device=device, dtype=dtype).eval()
    args, kwargs = cast(args, dtype, device), cast(kwargs, dtype, device)

    ours = output(pare_module(*args, **kwargs, **(pare_kwargs or {})))
    theirs = output(diffusers_module(*args, **kwargs))
    reference = None
    if dtype in (torch.float16, torch.bfloat16):
        module64 = copy.deepcopy(diffusers_module).double()
        reference = output(module64(*cast(args, torch.float64, device), **cast(kwargs, torch.float64, device)))
        del module64
    return assert_parity(name, ours, theirs, reference, dtype=dtype, scope=scope)


ROOT = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict:
    """The environment for a `pare` subprocess (torchrun): one thread, this checkout first on the path, and the
    caller's PYTHONPATH kept (on the GPU machine diffusers is installed there, with pip --target)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
