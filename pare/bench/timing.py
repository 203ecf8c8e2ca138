"""Latency and memory of pare beside diffusers, in one process, on the same weights and inputs.

`pare bench` and `benchmarks/run.py` run this. Every case is timed for both libraries in
every mode asked for, one after the other, so the figures to quote are the *ratios* within one
run (eager timings are bound by the CPU launching kernels and move between runs).

Figures per case: median and spread (10th-90th percentile) of N timed runs measured with
CUDA events after warm-up; peak memory (`torch.cuda.max_memory_allocated`, reset per case, and
`max_memory_reserved`, which counts CUDA graph pools as they stay held); FLOPs (`torch.utils.flop_counter.FlopCounterMode`) and the time they would take at the
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

MODES = ("eager", "graph", "compile", "compile-ro", "compile-graph", "fast")
# compile-graph: channels last, torch.compile (default mode), and the compiled call captured in a CUDA
#   graph by hand, so that only its kernels count: the best a patient user gets from either library.
# fast: pare's fast path (pare/fast/), captured in a CUDA graph for models; whole pipelines run with
#   pipe.enable_fast(), whose UNet replays CUDA graphs. pare only (diffusers has no such mode).
PARE_ONLY_MODES = ("fast",)
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
    # torch.cuda.max_memory_reserved: what the caching allocator held at its peak, CUDA graph pools included (a
    # graph's pool stays reserved after its capture, while max_memory_allocated counts only live tensors)
    peak_reserved_gib: float | None = None

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
            device: torch.device, graphable: bool = True) -> tuple[Callable[[], object], float | None, str]:
    """The callable to time for `mode`, its set-up time in seconds (compile, or the fast path's first call), a note.

    `compile-graph` and `fast` change the model in place (layout, block classes): `undo(mode, model)` after.
    """
    if mode == "eager":
        return (lambda: call(model)), None, ""
    if mode in ("graph", "compile-graph") and device.type != "cuda":
        raise ValueError(f"mode {mode!r} needs CUDA")
    if mode == "graph":
        return in_cuda_graph(lambda: call(model), device), None, ""
    if mode in ("compile", "compile-ro", "compile-graph"):
        if mode == "compile-graph":
            for m in _targets(model):
                m.to(memory_format=torch.channels_last)
        # Compile the call, not the module, so that methods like vae.decode are compiled too.
        compiled = torch.compile(call, mode="reduce-overhead" if mode == "compile-ro" else None)
        t0 = time.perf_counter()
        for _ in range(3):  # reduce-overhead records its graph on the 2nd/3rd call
            compiled(model)
        synchronize(device)
        if mode == "compile-graph":
            fn = in_cuda_graph(lambda: compiled(model), device)
            return fn, time.perf_counter() - t0, "channels last; compile time includes 3 calls and the capture"
        return (lambda: compiled(model)), time.perf_counter() - t0, "compile time includes 3 calls"
    if mode == "fast":
        import pare.fast

        t0 = time.perf_counter()
        for m in _targets(model):
            pare.fast.optimize(m)  # a pipeline as a whole (its UNet graphed on CUDA), or a model's blocks
        if graphable and device.type == "cuda":
            fn = in_cuda_graph(lambda: call(model), device)
        else:
            call(model)  # a pipeline: its first call captures the UNet's graphs
            fn = lambda: call(model)  # noqa: E731
        synchronize(device)
        return fn, time.perf_counter() - t0, "set-up time: optimize, Triton compiles (cached after the first run), capture"
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _targets(model) -> list:
    """What compile-graph and fast change: the model, or each model of a (UNet, ControlNet) pair."""
    return list(model) if isinstance(model, (tuple, list)) else [model]


def undo(mode: str, model) -> None:
    """Put the model back as the reference modes expect it, after `compile-graph` or `fast`."""
    if mode == "fast":
        import pare.fast

        for m in _targets(model):
            pare.fast.restore(m)
    elif mode == "compile-graph":
        for m in _targets(model):
            m.to(memory_format=torch.contiguous_format)


def bench_case(run: Run, case: str, library: str, model: torch.nn.Module, call: Callable[[torch.nn.Module], object],
               modes: tuple[str, ...], device: torch.device, peak_flops: float, warmup: int, iters: int,
               progress: Callable[[str], None] = print, stages: Callable | None = None, graphable: bool = True) -> None:
    """Time one (case, library) in every mode and append the results to `run`."""
    gflop = None
    try:
        gflop = count_flops(lambda: call(model)) / 1e9
    except Exception as e:  # the counter cannot trace some ops; latency is still measured
        progress(f"  flop count failed for {case}/{library}: {type(e).__name__}: {e}")
    for mode in modes:
        if mode in PARE_ONLY_MODES and library != "pare":
            continue
        progress(f"  {case:<22} {library:<9} {mode}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                fn, compile_s, note = prepare(mode, model, call, device, graphable)
                times = time_ms(fn, device, warmup, iters)
        except Exception as e:  # one failing mode must not lose the rest of the run
            undo(mode, model)
            progress(f"    failed: {type(e).__name__}: {str(e)[:200]}")
            run.results.append(Result(case, library, mode, float("nan"), float("nan"), float("nan"), 0, None, gflop,
                                      None, note=f"failed: {type(e).__name__}: {str(e)[:200]}"))
            torch._dynamo.reset()
            continue
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
        floor = gflop * 1e9 / peak_flops * 1e3 if gflop else None
        stages_ms = None
        if stages is not None and mode in ("eager", "fast"):
            with torch.no_grad():
                stages_ms = time_stages(lambda: call(model), stages(model), device)
        undo(mode, model)
        run.results.append(Result(case, library, mode, statistics.median(times), q[0], q[-1], len(times), peak, gflop,
                                  floor, compile_s, note, stages_ms, reserved))
        if mode.startswith("compile"):
            torch._dynamo.reset()  # free the compiled graphs before the next case
