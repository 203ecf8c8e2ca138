"""A stochastic sampler's noise, drawn ahead of the loop, so that one CUDA graph of the loop can replay it.

Replaces, inside the loop graph (`loop.py`): the draws of a scheduler's `step` (`pare/schedulers/scheduling_utils.py
randn_tensor`, which every pare scheduler draws with: Euler ancestral, DPM-Solver's SDE types, DDIM with eta > 0,
DDPM, LCM...). A capture cannot hold them: a CPU generator's noise is drawn on the host and copied in (a host copy),
and a graph replays the draws of its capture, not the generator's next ones.

What: a warm-up of the loop records each draw (`Tape.draw`: its shape, dtype and device, and that it came from the
generator the call passed, or from torch's default one). The capture reads its noise from a (draws, ...) buffer
instead (`Tape.played`). Before each replay, `draw_ahead` makes the same draws in the same order from this call's
generator into it. The draws are the stepping loop's, value for value (nothing else in the loop draws from that
generator), and the generator is left where the stepping loop leaves it.

Cost: the draws are made on the host (a CPU generator) or as small launches (a CUDA one) before the replay, not
between its steps; the host makes them while the GPU runs what the pipeline queued before the loop.
"""

from __future__ import annotations

import contextlib

import torch

from ..schedulers.scheduling_utils import randn_tensor


class Tape:
    """The draws of one loop: recorded at a warm-up, then (`played`) read from a (draws, ...) buffer that each replay
    fills (`draw_ahead`)."""

    def __init__(self, generator):
        self.generator = generator  # the call's: its draws are the ones a replay can make ahead
        self.specs: list[tuple] = []  # (shape, dtype, device) of each draw, in order
        self.play: torch.Tensor | None = None  # (draws, ...), once played
        self.at = 0  # the next draw played
        self.drawing = False  # inside a recorded draw: its random op is the tape's (`Recorder` in loop.py)
        self.foreign: str | None = None  # why the draws cannot be made ahead, if they cannot

    def played(self) -> Tape:
        """This tape, to be played from now on: a buffer for its draws."""
        shape, dtype, device = self.specs[0]
        self.play = torch.empty((len(self.specs), *shape), dtype=dtype, device=device)
        return self

    def rewind(self) -> None:
        self.at = 0

    def draw(self, shape, generator, device, dtype) -> torch.Tensor:
        """`randn_tensor`'s signature: the next draw, recorded or played."""
        spec = (tuple(shape), dtype, torch.device(device))
        if self.play is not None:  # the loop the warm-up recorded, run again: the same draws
            if self.at >= len(self.specs) or spec != self.specs[self.at]:
                raise RuntimeError(f"pare.fast: draw {self.at} of the captured loop is {spec}, not a draw recorded")
            self.at += 1
            return self.play[self.at - 1]  # (...): a view of the replay's input
        if generator is not self.generator and self.foreign is None:
            self.foreign = "a draw from a generator the call did not pass"
        if self.specs and spec != self.specs[0] and self.foreign is None:
            self.foreign = f"draws of two shapes or dtypes ({self.specs[0]}, {spec})"
        self.specs.append(spec)
        self.drawing = True
        try:
            return randn_tensor(shape, generator, device, dtype)
        finally:
            self.drawing = False


def step_draw(scheduler):
    """What `scheduler.step` draws its noise with now: the name `randn_tensor` in the globals of the module that
    defines its step (a tape's `draw` inside `drawing_from`), or None for a step that does not draw through it."""
    return type(scheduler).step.__globals__.get("randn_tensor")


@contextlib.contextmanager
def drawing_from(scheduler, tape: Tape | None):
    """While active, `scheduler.step` draws through `tape` (`step_draw`'s name is the tape's; one loop at a time: a
    module global). No tape, or a step that does not draw through randn_tensor: nothing changes."""
    module = type(scheduler).step.__globals__
    real = step_draw(scheduler)
    if tape is None or real is None:
        yield
        return
    module["randn_tensor"] = tape.draw
    try:
        yield
    finally:
        module["randn_tensor"] = real


def draw_ahead(specs: list[tuple], generator) -> torch.Tensor:
    """The draws `specs` (all of one shape, dtype and device), made from `generator` in order as the loop would make
    them: (draws, ...). A CPU generator draws on the CPU, as `randn_tensor` does, and the tape moves once."""
    shape, dtype, device = specs[0]
    on_host = isinstance(generator, torch.Generator) and generator.device.type == "cpu"
    draws = [randn_tensor(shape, generator, "cpu" if on_host else device, dtype) for _ in specs]
    return torch.stack(draws).to(device)
