"""Where a full text-to-image run spends its time: per-stage totals from hooks on the stage modules.

Forward pre- and post-hooks on each stage's modules (the text encoders, the UNet, the VAE's
decoder) bracket every call with CUDA events (host clock on a CPU); after the run the
intervals are summed per stage. What no stage covers (scheduler steps, CFG arithmetic,
dtype casts such as SDXL's VAE upcast, the host's gaps between calls) is reported as "other".
The same hooks go on both libraries' modules, so their shares are measured the same way.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


class StageTimer:
    """Context manager: while inside, every call of a stage's modules is bracketed and recorded."""

    def __init__(self, stages: dict[str, list[nn.Module]], device: torch.device):
        self.stages, self.cuda = stages, device.type == "cuda"
        self.spans: dict[str, list] = {name: [] for name in stages}
        self._open: dict[int, list] = {}
        self._handles = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> "StageTimer":
        for name, modules in self.stages.items():
            for module in modules:
                def start(m, args):
                    self._open.setdefault(id(m), []).append(self._mark())

                def stop(m, args, out, name=name):
                    self.spans[name].append((self._open[id(m)].pop(), self._mark()))

                self._handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return {name: sum(self._ms(a, b) for a, b in spans) for name, spans in self.spans.items()}


def time_stages(fn: Callable[[], object], stages: dict[str, list[nn.Module]], device: torch.device) -> dict[str, float]:
    """One run of `fn` with its stages timed: {stage: ms, ..., "other": ms, "total": ms}."""
    timer = StageTimer(stages, device)
    with timer:
        start = timer._mark()
        fn()
        end = timer._mark()
    totals = timer.totals_ms()
    total = timer._ms(start, end)
    return {**totals, "other": total - sum(totals.values()), "total": total}
