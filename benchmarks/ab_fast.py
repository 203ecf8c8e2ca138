"""A/B of the fast path's options on one UNet, in one run: each variant captured in its own CUDA graph,
the graphs replayed in alternating rounds, so that the ratios between them are fair (same machine,
same clocks, same weights).

    python benchmarks/ab_fast.py --models sd15,sdxl --out DIR

Variants (the weights stay where they are between captures; only block classes and flags change):
    fast              pare.fast as shipped
    no-block-fusion   the transformer blocks as the reference (residual adds as passes of their own)
    cudnn-benchmark   as fast, captured with torch.backends.cudnn.benchmark on (cuDNN times its algorithms)
The figures feed benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    from pare.bench import workloads
    from pare.bench.timing import in_cuda_graph, time_ms
    from pare.fast import optimize_model
    from pare.fast.transformer import FastBasicTransformerBlock
    from pare.models.transformer import BasicTransformerBlock
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ref, device = import_reference(None), torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cases": {}}

    def set_blocks(model, cls):
        for m in model.modules():
            if isinstance(m, BasicTransformerBlock):
                m.__class__ = cls

    for family in args.models.split(","):
        w = workloads.build(ref, family, "unet", device, torch.float16, args.batch)
        model = optimize_model(w.ours)
        call = lambda: w.call_ours(model)  # noqa: E731
        with torch.no_grad():
            graphs = {"fast": in_cuda_graph(call, device)}
            set_blocks(model, BasicTransformerBlock)
            graphs["no-block-fusion"] = in_cuda_graph(call, device)
            set_blocks(model, FastBasicTransformerBlock)
            torch.backends.cudnn.benchmark = True
            graphs["cudnn-benchmark"] = in_cuda_graph(call, device)
            torch.backends.cudnn.benchmark = False
            times = {k: [] for k in graphs}
            for _ in range(args.rounds):
                for name, fn in graphs.items():
                    times[name] += time_ms(fn, device, warmup=3, iters=args.iters)
        med = {k: statistics.median(v) for k, v in times.items()}
        results["cases"][w.name] = {k: {"ms": v, "x_fast": v / med["fast"]} for k, v in med.items()}
        print(w.name, "  ".join(f"{k} {v:.3f} ms ({v / med['fast']:.3f}x)" for k, v in med.items()), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "ab_fast.json").write_text(json.dumps(results, indent=1))
        del w, model, graphs, call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
