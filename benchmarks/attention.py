"""The UNets' attention, per shape of the SD1.5 and SDXL UNets: PyTorch's SDPA (cuDNN's flash kernel on an
H100 or H200), against pare's Triton kernel (`pare/fast/kernels/attention.py`) at a few tile configurations
(at every shape, MAX_KEYS lifted), and against `attention` as shipped ("pare": the kernel over few keys only).

    python benchmarks/attention.py --out DIR

Q, K and V are views of one fused projection, as `FastAttention` hands them over (self-attention: q, k, v of one
(B, N, 3 inner) tensor; cross-attention: k, v of one (B, 77, 2 inner)), and each variant's output is the
(B, N, inner) tensor the output projection reads. Each variant runs REPEAT times in one CUDA graph, the graphs
replayed in alternating rounds, so the ratios are fair. Each shape's count per UNet call (batch 2) weighs it into
a per-UNet total. Every variant's error against float64 is printed beside SDPA's. The figures feed
benchmarks/NOTES.md (change 39).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton

from pare.bench import environment
from pare.bench.timing import in_cuda_graph, time_ms
from pare.fast.kernels import attention as ak

# (model, batch, heads, queries N, keys M (0: self-attention, M = N), head dim, calls of that shape per UNet call)
SHAPES = [("sd15", 2, 8, 4096, 0, 40, 5), ("sd15", 2, 8, 4096, 77, 40, 5), ("sd15", 2, 8, 1024, 0, 80, 5),
          ("sd15", 2, 8, 1024, 77, 80, 5), ("sd15", 2, 8, 256, 0, 160, 5), ("sd15", 2, 8, 256, 77, 160, 5),
          ("sdxl", 2, 10, 4096, 0, 64, 10), ("sdxl", 2, 10, 4096, 77, 64, 10), ("sdxl", 2, 20, 1024, 0, 64, 60),
          ("sdxl", 2, 20, 1024, 77, 64, 60)]
# (BLOCK_M, BLOCK_N, warps, stages). Session 13's first run also tried half the exponentials by a polynomial on the
# FMA units (FlashAttention-4's idea) at (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
# (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 2): slower than the special-function unit alone at every shape.
CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3), (64, 32, 2, 3), (128, 64, 8, 2),
           (128, 32, 4, 3), (128, 64, 4, 2), (64, 16, 4, 3)]
REPEAT = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--configs", default=None, metavar="I,J", help="indices into CONFIGS (default: all)")
    parser.add_argument("--models", default="sd15,sdxl")
    args = parser.parse_args()
    device = torch.device("cuda")
    import diffusers
    results = {"environment": environment(device, diffusers.__version__), "repeat": REPEAT, "shapes": {}}
    configs = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    totals: dict[str, dict[str, float]] = {}
    for model, b, heads, n, m, d, count in SHAPES:
        if model not in args.models.split(","):
            continue
        g = torch.Generator(device).manual_seed(n + m + d)
        inner = heads * d
        if m == 0:
            q, k, v = torch.randn(b, n, 3 * inner, generator=g, device=device).half().chunk(3, dim=-1)
        else:
            q = torch.randn(b, n, inner, generator=g, device=device).half()
            k, v = torch.randn(b, m, 2 * inner, generator=g, device=device).half().chunk(2, dim=-1)
        exact = ak.reference(q.double(), k.double(), v.double(), heads)
        variants = {"sdpa": lambda: ak.reference(q, k, v, heads), "pare": lambda: ak.attention(q, k, v, heads)}
        for c in configs:
            if c[0] * max(16, 1 << (d - 1).bit_length()) > 128 * 128:  # its float32 accumulator would spill
                continue
            variants["triton " + "x".join(map(str, c))] = (
                lambda c=c: ak.attention(q, k, v, heads, max_keys=1 << 30, block_m=c[0], block_n=c[1], warps=c[2],
                                         stages=c[3]))
        graphs, errors = {}, {}
        for name, fn in list(variants.items()):
            try:
                errors[name] = float((fn().double() - exact).norm() / exact.norm())
            except triton.runtime.errors.OutOfResources:  # the tile does not fit this head dimension
                del variants[name]
                continue
            graphs[name] = in_cuda_graph(lambda fn=fn: [fn() for _ in range(REPEAT)], device)
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, replay in graphs.items():
                times[name] += time_ms(replay, device, warmup=2, iters=args.iters)
        med = {name: statistics.median(t) / REPEAT * 1000 for name, t in times.items()}  # microseconds per call
        key = f"{model} B={b} heads={heads} N={n} M={m or n} d={d}"
        results["shapes"][key] = {name: {"us": med[name], "x_sdpa": med[name] / med["sdpa"], "err64": errors[name]}
                                  for name in variants}
        row = totals.setdefault(model, {})
        for name in variants:
            row[name] = row.get(name, 0.0) + count * med[name] / 1000
        best = min((x for x in variants if x.startswith("triton")), key=med.get)
        print(f"{key}: sdpa {med['sdpa']:.1f} us (err {errors['sdpa']:.2e}); best {best} {med[best]:.1f} us "
              f"({med[best] / med['sdpa']:.3f}x, err {errors[best]:.2e})", flush=True)
        print("   " + "  ".join(f"{x.split(' ')[-1]} {med[x]:.1f}" for x in variants), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "attention.json").write_text(json.dumps(results | {"per_unet_ms": totals}, indent=1))
    for model, row in totals.items():  # configs that skipped a shape are missing from its total: compare with care
        print(model, "per UNet call (ms):", "  ".join(f"{x.split(' ')[-1]} {t:.3f}" for x, t in row.items()))


if __name__ == "__main__":
    main()
