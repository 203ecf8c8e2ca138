"""Parity rows for a scheduler: its timesteps, one step, and a whole denoising loop.

A scheduler has no blocks to hook, so its report compares what a pipeline sees of it: the
timestep sequence (which must be identical), then the sample after the first step and after
the whole loop, driven on both sides by the same stand-in "model".
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..schedulers import get_scheduler_class
from .compare import Comparison, compare
from .tolerances import Tolerance, tolerance_for


def dummy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for the UNet, identical for both libraries."""
    return 0.3 * sample + 0.1 * torch.sin(sample * 3 + float(t) / 100)


def scheduler_rows(reference: ModuleType, config: dict, *, steps: int = 50, device: torch.device,
                   dtype: torch.dtype, seed: int, shape=(1, 4, 32, 32), eta: float = 0.0) -> list[Comparison]:
    name = config.get("_class_name", "DDIMScheduler")
    ours = get_scheduler_class(name).from_config(config)
    theirs = getattr(reference, name).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    ours.set_timesteps(steps, device=device)
    theirs.set_timesteps(steps, device=device)

    exact = Tolerance(rel_l2=0.0)  # timesteps are integers: no rounding is excusable
    rows = [compare(f"{name}.timesteps ({steps} steps)", ours.timesteps.double(), theirs.timesteps.double(),
                    dtype="fp64", tolerance=exact)]

    # A stochastic loop (DDPM, or DDIM with eta > 0) cannot have a float64 twin: its noise is drawn in the
    # sample's dtype, so a float64 run sees other random numbers. Such loops are judged by rel L2 alone.
    stochastic = name == "DDPMScheduler" or eta > 0
    libs = {"pare": ours, "diffusers": theirs}
    if not stochastic and dtype != torch.float32:
        libs["ref64"] = getattr(reference, name).from_config(dict(theirs.config))
        libs["ref64"].set_timesteps(steps, device=device)
    start = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    samples = {lib: (start.double() if lib == "ref64" else start.to(dtype)) * s.init_noise_sigma for lib, s in libs.items()}
    generators = {lib: torch.Generator(device).manual_seed(seed + 1) for lib in libs}
    kw = {"eta": eta} if name == "DDIMScheduler" else {}

    def judged(label, scope):
        tol = tolerance_for(dtype, scope)
        if stochastic:
            tol = Tolerance(rel_l2=tol.rel_l2)
        return compare(label, samples["pare"], samples["diffusers"], samples.get("ref64"), dtype=dtype, tolerance=tol)

    for i, t in enumerate(theirs.timesteps):
        for lib, sched in libs.items():
            x = sched.scale_model_input(samples[lib], t)
            samples[lib] = sched.step(dummy_model(x, t), t, samples[lib], generator=generators[lib], **kw).prev_sample
        if i == 0:
            rows.append(judged(f"{name}.step (first, t={int(t)})", "block"))
    rows.append(judged(f"{name} loop ({steps} steps{', stochastic' if stochastic else ''})", "end_to_end"))
    return rows
