"""The GEGLU up-projection, per shape of the SD1.5 and SDXL UNets: PyTorch's GEMM then the gate kernel
(`geglu(F.linear(...))`), against the fused GEMM (`geglu_linear`) at each of a few tile configurations.

    python benchmarks/gemm_geglu.py --out DIR

Each variant runs REPEAT times in one CUDA graph, the graphs replayed in alternating rounds, so that the
ratios are fair and launch gaps count as in a UNet's graph. By default the REPEAT calls read the same x
and weights, which then sit in L2 (50 MB on an H200), unlike a UNet's blocks, whose weights arrive cold:
`--cold` makes the calls cycle over enough copies of x, weight and bias (over 128 MB) that each call's
operands have left L2 since their last use (colder than a UNet, where x has just been written by the
LayerNorm before it). Each shape's count per UNet call (batch 2) weighs it into a per-UNet total. Every fused variant's error against float64 is printed beside the
two-step path's. The figures feed benchmarks/NOTES.md (change 24).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from pare.bench import environment
from pare.bench.timing import in_cuda_graph, time_ms
from pare.fast.kernels import geglu as gk

# (model, tokens of a batch-2 call, K = dim, D = inner, blocks of that shape per UNet call)
SHAPES = [("sd15", 8192, 320, 1280, 5), ("sd15", 2048, 640, 2560, 5), ("sd15", 512, 1280, 5120, 5),
          ("sd15", 128, 1280, 5120, 1), ("sdxl", 8192, 640, 2560, 10), ("sdxl", 2048, 1280, 5120, 60)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, row tiles a group). Session 7's first run also tried pointer
# loads (slower than the two steps everywhere) and (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
# (128, 64, 64, 4, 4), (128, 64, 32, 8, 5), (256, 64, 64, 8, 3), (64, 64, 64, 4, 4) with TMA: all slower than the first.
CONFIGS = [(128, 64, 64, 8, 3, 8), (128, 64, 64, 8, 2, 8), (128, 64, 128, 8, 2, 8), (128, 64, 64, 8, 3, 4),
           (128, 64, 64, 8, 3, 16), (128, 64, 32, 8, 3, 8), (64, 64, 64, 4, 3, 8), (128, 32, 64, 4, 3, 8)]
NAMES = ("GEMM_BLOCK_M", "GEMM_BLOCK_N", "GEMM_BLOCK_K", "GEMM_WARPS", "GEMM_STAGES", "GEMM_GROUP_M")
REPEAT = 20


def fused(config):
    """geglu_linear with the tile `config`, at every size (GEMM_MIN_ROWS lowered), to time it."""
    def call(x, w, b):
        with mock.patch.multiple(gk, **dict(zip(NAMES, config)), GEMM_MIN_ROWS=1):
            return gk.geglu_linear(x, w, b)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cold", action="store_true", help="cycle over copies of the operands larger than L2")
    parser.add_argument("--configs", default=None, metavar="I,J", help="indices into CONFIGS (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda")
    import diffusers
    results = {"environment": environment(device, diffusers.__version__), "repeat": REPEAT, "cold": args.cold,
               "shapes": {}}
    configs = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    variants = {"two-step": lambda x, w, b: gk.geglu(F.linear(x, w, b))}
    variants.update({"fused " + "x".join(map(str, c)): fused(c) for c in configs})
    totals = {"sd15": {k: 0.0 for k in variants}, "sdxl": {k: 0.0 for k in variants}}
    for model, m, k, d, count in SHAPES:
        g = torch.Generator(device).manual_seed(m + k)
        x = torch.randn(2, m // 2, k, generator=g, device=device).half()
        w = (torch.randn(2 * d, k, generator=g, device=device) / k**0.5).half()
        b = torch.randn(2 * d, generator=g, device=device).half()
        exact = gk.reference(F.linear(x.double(), w.double(), b.double()))
        size = sum(t.numel() * t.element_size() for t in (x, w, b))
        copies = [(x, w, b)] + [(x.clone(), w.clone(), b.clone()) for _ in range(-(-2**27 // size) if args.cold else 0)]
        operands = [copies[i % len(copies)] for i in range(REPEAT)]  # cold: each call's operands unused since long
        graphs, errors = {}, {}
        for name, fn in variants.items():
            errors[name] = float((fn(x, w, b).double() - exact).norm() / exact.norm())
            graphs[name] = in_cuda_graph(lambda fn=fn: [fn(*o) for o in operands], device)
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, replay in graphs.items():
                times[name] += time_ms(replay, device, warmup=2, iters=args.iters)
        med = {name: statistics.median(t) / REPEAT * 1000 for name, t in times.items()}  # microseconds per call
        key = f"{model} M={m} K={k} D={d}"
        results["shapes"][key] = {name: {"us": med[name], "x_two_step": med[name] / med["two-step"],
                                         "err64": errors[name]} for name in variants}
        for name in variants:
            totals[model][name] += count * med[name] / 1000
        best = min((n for n in variants if n != "two-step"), key=med.get)
        print(f"{key}: two-step {med['two-step']:.1f} us (err {errors['two-step']:.2e}); best {best} "
              f"{med[best]:.1f} us ({med[best] / med['two-step']:.3f}x, err {errors[best]:.2e})", flush=True)
        print("   " + "  ".join(f"{n.split(' ')[-1]} {med[n]:.1f}" for n in variants), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gemm_geglu.json").write_text(json.dumps(results | {"per_unet_ms": totals}, indent=1))
    for model, row in totals.items():
        print(model, "per UNet call (ms):", "  ".join(f"{n.split(' ')[-1]} {v:.3f}" for n, v in row.items()))


if __name__ == "__main__":
    main()
