"""Parity rows for a scheduler: its timesteps, then every step, local and accumulated.

A scheduler has no blocks to hook, so its report compares what a pipeline sees of it, driven
on both sides by the same stand-in "model" (`dummy_model`):

- `timesteps`: the sequence must be identical.
- `step i`, local: at every step both schedulers get the same sample (diffusers' trajectory so
  far), the same model output and a generator in the same state, so a row measures that step's
  own arithmetic and an edit is named at the first step it changes (an index that only bites
  at the last step is named there). Multistep state (DPM-Solver's model outputs, PLMS' ets)
  builds up on both sides from the same inputs.
- `step i`, accumulated: each scheduler runs on its own trajectory, as in a real loop.
- `scale_model_input i`: for schedulers whose model input is not the sample itself (Euler and
  the other sigma schedulers), the scaled input on both sides for the same sample.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import torch

from ..schedulers import get_scheduler_class
from ..schedulers.samplers import resolve
from .compare import Comparison, Row, compare
from .tolerances import Tolerance, tolerance_for


def dummy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for the UNet, identical for both libraries."""
    return 0.3 * sample + 0.1 * torch.sin(sample * 3 + float(t) / 100)


def step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict:
    """What a pipeline passes to `step` besides (model_output, t, sample): diffusers' `prepare_extra_step_kwargs`."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepted}


def is_stochastic(make_scheduler, steps: int, shape, device, eta: float) -> bool:
    """Does the loop draw noise? Asked of the code itself: two runs with differently seeded generators differ.

    (DDPM always; DDIM when eta > 0; ancestral and SDE samplers; Euler with s_churn; LCM between steps.)
    """
    finals = []
    for seed in (1, 2):
        scheduler = make_scheduler()
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device) * scheduler.init_noise_sigma
        generator = torch.Generator(device).manual_seed(seed)
        for t in scheduler.timesteps:
            y = scheduler.scale_model_input(x, t)
            x = scheduler.step(dummy_model(y, t), t, x, **step_kwargs(scheduler, generator, eta)).prev_sample
        finals.append(x)
    return not torch.equal(*finals)


def scheduler_rows(reference: ModuleType, config: dict, *, steps: int = 50, device: torch.device,
                   dtype: torch.dtype, seed: int, shape=(1, 4, 32, 32), eta: float = 0.0,
                   name: str | None = None) -> list[Row]:
    """Rows for scheduler `name` (default: the config's `_class_name`, else DDIM) built from `config` on both sides."""
    name = name or config.get("_class_name", "DDIMScheduler")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    sampler = resolve(name)  # a class, or a web-UI sampler name's class and options
    make_ours = lambda: get_scheduler_class(sampler.class_name).from_config(config, **sampler.options)  # noqa: E731
    make_theirs = lambda: getattr(reference, sampler.class_name).from_config(config, **sampler.options)  # noqa: E731
    ours, ours_local, theirs = make_ours(), make_ours(), make_theirs()
    stochastic = is_stochastic(make_theirs, steps, shape, device, eta)
    # A stochastic step cannot have a float64 twin: its noise is drawn in the sample's dtype, so a float64 run
    # sees other random numbers. Such steps are judged by rel L2 alone.
    with64 = not stochastic and dtype not in (torch.float32, torch.float64)
    exact, exact_local = (make_theirs(), make_theirs()) if with64 else (None, None)
    for s in (ours, ours_local, theirs, exact, exact_local):
        if s is not None:
            s.set_timesteps(steps, device=device)

    integer = Tolerance(rel_l2=0.0)  # timesteps are integers: no rounding is excusable
    label = f"{name}.timesteps ({steps} steps)"
    if ours.timesteps.shape != theirs.timesteps.shape:  # the loops below would not line up
        raise AssertionError(f"{label}: pare has {len(ours.timesteps)} timesteps {ours.timesteps.tolist()}, "
                             f"diffusers {len(theirs.timesteps)} {theirs.timesteps.tolist()}")
    rows = [Row(label, compare(label, ours.timesteps.double(), theirs.timesteps.double(), dtype="fp64",
                               tolerance=integer))]

    def judged(label: str, pare_out, theirs_out, exact_out, scope: str) -> Comparison:
        tol = tolerance_for(dtype, scope)
        if stochastic:
            tol = Tolerance(rel_l2=tol.rel_l2)
        return compare(label, pare_out, theirs_out, exact_out, dtype=dtype, tolerance=tol)

    start = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    sample = {"pare": start.to(dtype) * ours.init_noise_sigma, "diffusers": start.to(dtype) * theirs.init_noise_sigma}
    if with64:
        sample["ref64"] = start.double() * exact.init_noise_sigma
    own = {"pare": ours, "diffusers": theirs, "ref64": exact}

    for i, t in enumerate(theirs.timesteps):
        x = sample["diffusers"]  # the local rows' input: diffusers' trajectory so far
        # Local: the same sample, model output and generator state into both (and the float64 twin).
        scaled = {"pare": ours_local.scale_model_input(x, t), "diffusers": theirs.scale_model_input(x, t)}
        model_output = dummy_model(scaled["diffusers"], t)
        # Every step on every side draws from a generator seeded alike: one seed gives one trajectory.
        local_gen = lambda: torch.Generator(device).manual_seed(seed + 1 + i)  # noqa: E731
        pare_local = ours_local.step(model_output, t, x, **step_kwargs(ours_local, local_gen(), eta)).prev_sample
        exact_step = None
        if with64:
            exact_scaled = exact_local.scale_model_input(x.double(), t)
            exact_step = exact_local.step(dummy_model(exact_scaled, t), t, x.double(),
                                          **step_kwargs(exact_local, local_gen(), eta)).prev_sample
        if not (torch.equal(scaled["pare"], x) and torch.equal(scaled["diffusers"], x)):
            rows.append(Row(f"{name}.scale_model_input {i + 1} (t={float(t):g})",
                            judged("scale_model_input", scaled["pare"], scaled["diffusers"],
                                   exact_scaled if with64 else None, "block")))
        # diffusers' own step on x is both its local and its accumulated result.
        theirs_next = theirs.step(model_output, t, x, **step_kwargs(theirs, local_gen(), eta)).prev_sample

        # Accumulated: pare (and the float64 twin) on their own trajectories.
        for lib in ("pare", "ref64"):
            if lib in sample:
                s = own[lib]
                y = s.scale_model_input(sample[lib], t)
                sample[lib] = s.step(dummy_model(y, t), t, sample[lib], **step_kwargs(s, local_gen(), eta)).prev_sample
        sample["diffusers"] = theirs_next

        step_label = f"{name}.step {i + 1} (t={float(t):g})"
        rows.append(Row(step_label,
                        local=judged(step_label, pare_local, theirs_next, exact_step, "block"),
                        accumulated=judged(step_label, sample["pare"], theirs_next, sample.get("ref64"), "end_to_end")))
    return rows
