"""Latency and memory of pare beside diffusers, in one process, on the same weights and inputs.

`pare bench` and `benchmarks/run.py` run this. Every case is timed for both libraries in
every mode asked for, one after the other, so the figures to quote are the *ratios* within one
run (eager timings are bound by the CPU launching kernels and move between runs).

Figures per case: median and spread (10th-90th percentile) of N timed runs measured with
CUDA events after warm-up; peak memory (`torch.cuda.max_memory_allocated`, reset per case);
FLOPs (`torch.utils.flop_counter.FlopCounterMode`) and the time they would take at the
matmul peak measured at the start of the same run (the "floor").

The reference library is handed in as a module (see `pare.parity.reference`): pare itself
never imports diffusers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .stages import time_stages

MODES = ("eager", "graph", "compile", "compile-ro")
LIBRARIES = ("pare", "diffusers")


@dataclass
class Result:
    case: str
    library: str
    mode: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    peak_mem_gib: float | None
    gflop: float | None
    floor_ms: float | None  # gflop at the measured matmul peak
    compile_s: float | None = None
    note: str = ""
    stages_ms: dict | None = None  # full pipelines: ms per stage in one extra eager run (see stages.py)

    @property
    def x_floor(self) -> float | None:
        return self.median_ms / self.floor_ms if self.floor_ms else None


@dataclass
class Run:
    header: dict
    results: list[Result] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"header": self.header, "results": [{**asdict(r), "x_floor": r.x_floor} for r in self.results]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-call times in ms: CUDA events on the GPU, the host clock (after a sync) elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of one large square matmul on random data: the ceiling the floors are measured against."""
    if device.type != "cuda":
        n = 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, warmup=3, iters=10))
    return 2 * n**3 / (ms / 1e3)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def in_cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture one call of `fn` (static inputs inside it) and return a replay; warm-up on a side stream first."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def prepare(mode: str, model: torch.nn.Module, call: Callable[[torch.nn.Module], object],
            device: torch.device) -> tuple[Callable[[], object], float | None, str]:
    """The callable to time for `mode`, its compile time in seconds, and a note."""
    if mode == "eager":
        return (lambda: call(model)), None, ""
    if mode == "graph":
        if device.type != "cuda":
            raise ValueError("mode 'graph' needs CUDA")
        return in_cuda_graph(lambda: call(model), device), None, ""
    if mode in ("compile", "compile-ro"):
        # Compile the call, not the module, so that methods like vae.decode are compiled too.
        compiled = torch.compile(call, mode="reduce-overhead" if mode == "compile-ro" else None)
        t0 = time.perf_counter()
        for _ in range(3):  # reduce-overhead records its graph on the 2nd/3rd call
            compiled(model)
        synchronize(device)
        return (lambda: compiled(model)), time.perf_counter() - t0, "compile time includes 3 calls"
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def bench_case(run: Run, case: str, library: str, model: torch.nn.Module, call: Callable[[torch.nn.Module], object],
               modes: tuple[str, ...], device: torch.device, peak_flops: float, warmup: int, iters: int,
               progress: Callable[[str], None] = print, stages: Callable | None = None) -> None:
    """Time one (case, library) in every mode and append the results to `run`."""
    gflop = None
    try:
        gflop = count_flops(lambda: call(model)) / 1e9
    except Exception as e:  # the counter cannot trace some ops; latency is still measured
        progress(f"  flop count failed for {case}/{library}: {type(e).__name__}: {e}")
    for mode in modes:
        progress(f"  {case:<22} {library:<9} {mode}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                fn, compile_s, note = prepare(mode, model, call, device)
                times = time_ms(fn, device, warmup, iters)
        except Exception as e:  # one failing mode must not lose the rest of the run
            progress(f"    failed: {type(e).__name__}: {str(e)[:200]}")
            run.results.append(Result(case, library, mode, float("nan"), float("nan"), float("nan"), 0, None, gflop,
                                      None, note=f"failed: {type(e).__name__}: {str(e)[:200]}"))
            torch._dynamo.reset()
            continue
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        floor = gflop * 1e9 / peak_flops * 1e3 if gflop else None
        stages_ms = None
        if stages is not None and mode == "eager":
            with torch.no_grad():
                stages_ms = time_stages(lambda: call(model), stages(model), device)
        run.results.append(Result(case, library, mode, statistics.median(times), q[0], q[-1], len(times), peak, gflop,
                                  floor, compile_s, note, stages_ms))
        if mode.startswith("compile"):
            torch._dynamo.reset()  # free the compiled graphs before the next case
