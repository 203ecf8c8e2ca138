"""Where a text-to-image call's wall time goes: when the GPU works, when it waits, and what the host was doing
while it waited.

    python benchmarks/image_timeline.py --model sd15 --steps 50 [--no-fast] [--json F]

One warm call under the torch profiler (kernels, copies and memsets; the host's CUDA runtime calls). The pipeline's
four steps and the host functions around the fast loop's replay are marked (`record_function`, set on the
instances and modules of this process only). The GPU's activity is merged into busy intervals; each stretch of the
call in which the GPU is idle is charged to the innermost mark the host was in, unless it lies between two kernels of
one CUDA graph launch: that idle is the graph's own (its kernels' gaps, which no host work could fill), charged to
"inside the graph launched in" the launch's mark. The host's runtime calls that blocked (a synchronize, a copy to
the host) are listed with their marks. A GPU idle for a host's work is time the image
pays for the host: the figure to shrink when the kernels are already as fast as they go.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
import tempfile

import torch

GPU = ("kernel", "gpu_memcpy", "gpu_memset")


def mark(owner, attr: str, label: str) -> None:
    """Bracket `owner.attr` (a function of a module or class, or a method set on an instance) in a profiler range."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, attr, marked)


def mark_pipeline(pipe) -> None:
    import pare.fast.graph as graph
    import pare.fast.loop as loop
    import pare.pipelines.stable_diffusion as sd

    for name in ("encode_prompt", "get_latent", "denoise", "vae_decode", "check_inputs", "clip_hidden_states"):
        mark(pipe, name, f"pipe.{name}")
    for name in ("check_call_arguments", "tokenize", "retrieve_timesteps"):
        if hasattr(sd, name):
            mark(sd, name, name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            mark(getattr(pipe, name), "forward", f"{name}.forward")
    mark(pipe.vae.decoder, "forward", "vae.decoder.forward")
    mark(pipe.vae, "decode", "vae.decode")
    for name in ("loop_key", "check_finite_once"):
        mark(loop, name, f"loop.{name}")
    mark(graph, "check_finite_once", "graph.check_finite_once")
    for cls in (graph.GraphCache, loop.LoopGraphs):
        for name in ("__call__", "moved", "hooked", "weights", "replay"):
            if name in vars(cls):
                mark(cls, name, f"{cls.__name__}.{name}")


def merged(intervals: list[tuple[float, float, int | None]]) -> list[tuple[float, float, int | None, int | None]]:
    """(start, end, correlation) of GPU events -> busy intervals (start, end, the correlation of the event that starts
    the interval, of the one that ends it): the runtime call (a kernel launch, a graph launch) each came from."""
    out: list[list] = []
    for a, b, c in sorted(intervals, key=lambda e: e[:2]):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1][1], out[-1][3] = b, c
        else:
            out.append([a, b, c, c])
    return [tuple(x) for x in out]


def innermost(ranges: list[tuple[float, float, str]], a: float, b: float) -> list[tuple[str, float]]:
    """Split [a, b] by the host ranges that cover it: (the innermost range's label, microseconds) per piece."""
    cuts = sorted({a, b} | {t for s, e, _ in ranges for t in (s, e) if a < t < b})
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        covering = [(e - s, label) for s, e, label in ranges if s <= mid < e]
        pieces.append((min(covering)[1] if covering else "(no mark)", hi - lo))
    return pieces


def mark_of(ranges: list[tuple[float, float, str]], a: float, b: float) -> str:
    """The innermost mark over most of [a, b] (of the instant a, where b == a)."""
    pieces = innermost(ranges, a, max(b, a + 1e-3))
    return max(pieces, key=lambda p: p[1])[0]


def analyse(trace: dict) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    call = next(e for e in events if e.get("name") == "image call")
    start = call["ts"]
    gpu = merged([(e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("correlation")) for e in events
                  if e.get("cat") in GPU and e["ts"] + e["dur"] > start])
    end = max(call["ts"] + call["dur"], gpu[-1][1] if gpu else 0.0)
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"] != "image call" and e["ts"] >= start]
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime"
                and "GraphLaunch" in e["name"] and "correlation" in e.get("args", {})}
    busy = sum(g[1] - g[0] for g in gpu)
    # each gap: (start, end, the correlation of the work before it, of the work after it)
    gaps = [(a, b, c0, c1) for (a, c0), (b, c1) in zip([(start, None)] + [(g[1], g[3]) for g in gpu],
                                                       [(g[0], g[2]) for g in gpu] + [(end, None)]) if b > a]
    idle = collections.Counter()
    for a, b, before, after in gaps:
        if before is not None and before == after and before in launches:  # between two kernels of one graph
            launch = launches[before]
            idle[f"inside the graph launched in {mark_of(ranges, launch['ts'], launch['ts'] + launch['dur'])}"] += b - a
            continue
        for label, us in innermost(ranges, a, b):
            idle[label] += us
    host = collections.Counter()
    for s, e, label in ranges:
        host[label] += e - s
    blocked = collections.Counter()
    for e in events:
        if e.get("cat") == "cuda_runtime" and e["ts"] >= start and e["dur"] > 20:
            blocked[f"{e['name']} in {mark_of(ranges, e['ts'], e['ts'] + e['dur'])}"] += e["dur"]
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return {
        "wall_ms": ms(end - start), "gpu_busy_ms": ms(busy), "gpu_idle_ms": ms(end - start - busy),
        "idle_by_host_mark_ms": {k: ms(v) for k, v in idle.most_common()},
        "host_time_by_mark_ms": {k: ms(v) for k, v in host.most_common()},
        "blocking_runtime_calls_ms": {k: ms(v) for k, v in blocked.most_common(20)},
        "largest_gaps_ms": [(ms(a - start), ms(b - a), mark_of(ranges, a, b))
                            for a, b, *_ in sorted(gaps, key=lambda g: g[0] - g[1])[:15]],
    }


def main() -> None:
    from pare.bench import environment, workloads
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-fast", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = import_reference(None)
    header = {**environment(device, ref.__version__), "command": " ".join(["python"] + sys.argv)}
    print(header, flush=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = workloads.build(ref, args.model, "pipeline", device, dtype, steps=args.steps)
    if not args.no_fast:
        w.ours.enable_fast()
    mark_pipeline(w.ours)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):  # warm-up: captures, Triton compiles, then one replay
            w.call_ours(w.ours)
        sync()
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("image call"):
                w.call_ours(w.ours)
            sync()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as g:
            result = analyse(json.load(g))
    result = {**header, "case": w.name, "fast": not args.no_fast, **result}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
