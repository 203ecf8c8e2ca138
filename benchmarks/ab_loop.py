"""A/B of the denoising loop on the fast path, in one run: the whole loop from one CUDA graph (pare/fast/loop.py)
against the same pipeline stepping (the UNet from its per-step graph, guidance and scheduler launched eagerly),
the loop graph without the guided step fused (pare/fast/denoise.py `FUSED_STEP` = 0: the class's loop, so without
the two changes below either), the loop graph with the fused step's arithmetic done by PyTorch's ops, not its kernel
(kernels/guided_step.py `TRITON_STEP` = 0: the kernel's own share, the rest kept), the loop graph without the CFG
batch's text-free prefix shared (pare/fast/unet.py `SHARED_PREFIX` = 0), and the loop graph with the text's K and V
projected at every step (pare/fast/denoise.py `HOLD_TEXT` = 0).
The six are timed in alternating rounds, so the ratio is fair (same machine, same clocks, same weights).

    python benchmarks/ab_loop.py --models sd15 --steps 50 [--scheduler EulerDiscreteScheduler] --out DIR

The figures feed benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def main() -> None:
    import pare.fast.denoise as fast_denoise
    import pare.fast.kernels.guided_step as guided
    import pare.fast.unet as fast_unet
    from pare.bench import environment, workloads
    from pare.bench.timing import time_ms
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--scheduler", default=None, help="a pare scheduler class name, or a web-UI sampler name "
                        "such as 'DPM++ 2M SDE Karras' (default: the workload's DDIM)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ref, device = import_reference(None), torch.device("cuda")
    header = {**environment(device, ref.__version__), "dtype": "float16", "command": " ".join(["python"] + sys.argv)}
    print(header, flush=True)
    results = {**header, "cases": {}}
    for family in args.models.split(","):
        w = workloads.build(ref, family, "pipeline", device, torch.float16, steps=args.steps)
        pipe = w.ours
        if args.scheduler:
            from pare.schedulers import get_scheduler_class
            from pare.schedulers.samplers import resolve

            sampler = resolve(args.scheduler)  # a class name, or a web-UI sampler name (its class and options)
            pipe.scheduler = get_scheduler_class(sampler.class_name).from_config(pipe.scheduler.config, **sampler.options)
        pipe.enable_fast()
        graphed = vars(pipe)["denoise"]

        caches, active = {}, [None]  # each loop-graph variant keeps its own graphs: the switch is read at capture

        def variant(name):  # "loop graph": the instance's loop; "step by step": the class's
            if active[0] is not None and "_pare_loop" in vars(pipe):
                caches[active[0]] = vars(pipe).pop("_pare_loop")
            active[0] = name
            fast_denoise.FUSED_STEP = int(name != "loop graph, step unfused")
            fast_unet.SHARED_PREFIX = int(name != "loop graph, prefix unshared")
            fast_denoise.HOLD_TEXT = int(name != "loop graph, text K/V every step")
            guided.TRITON_STEP = int(name != "loop graph, step by torch ops")
            if name == "step by step":
                vars(pipe).pop("denoise", None)
                return
            vars(pipe)["denoise"] = graphed
            if name in caches:
                vars(pipe)["_pare_loop"] = caches[name]

        times = {"loop graph": [], "loop graph, step unfused": [], "loop graph, step by torch ops": [],
                 "loop graph, prefix unshared": [], "loop graph, text K/V every step": [], "step by step": []}
        with torch.no_grad():
            for name in times:  # warm-up: captures, Triton compiles
                variant(name)
                for _ in range(2):
                    w.call_ours(pipe)
            for _ in range(args.rounds):
                for name in times:
                    variant(name)
                    times[name] += time_ms(lambda: w.call_ours(pipe), device, warmup=0, iters=args.iters)
        variant("loop graph")
        fast_denoise.FUSED_STEP = fast_unet.SHARED_PREFIX = fast_denoise.HOLD_TEXT = guided.TRITON_STEP = 1
        replayed = [e is not None for e in pipe._pare_loop.graphs.values()]
        base = statistics.median(times["step by step"])
        case = {name: {"ms": statistics.median(t), "x_step_by_step": statistics.median(t) / base}
                for name, t in times.items()}
        case["loop replayed"] = replayed
        results["cases"][w.name] = case
        print(w.name, "  ".join(f"{n} {c['ms']:.2f} ms ({c['x_step_by_step']:.3f}x)" for n, c in case.items()
                                if isinstance(c, dict)), "replayed:", replayed, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ab_loop.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
