"""A/B of the fast path's options on one model, in one run: each variant captured in its own CUDA graph,
the graphs replayed in alternating rounds, so that the ratios between them are fair (same machine,
same clocks, same weights).

    python benchmarks/ab_fast.py --models sd15,sdxl --cases unet,vae-decode --out DIR \\
        --set layer_norm.TILE=4096,16384 --set group_norm.STATS_TILE=4096,8192

Variants (the weights stay where they are between captures; only block classes, flags and the
kernels' tile sizes change):
    fast              pare.fast as shipped
    no-block-fusion   the transformer blocks as the reference (residual adds as passes of their own)
    no-stack-fusion   a transformer of several blocks runs them one by one (each projects its own text K, V;
                      each adds its own last residual)
    own-stacks        each transformer projects its own text K, V (one stack per transformer, as SDXL), not
                      one GEMM for the whole model (SD1.x, SD2.x: `share_context`)
    proj-in-bias-pass the conv proj_in adds its own bias (a pass), not the first norm1 kernel
    sdpa=BACKEND      as fast, captured with that SDPA backend first (flash, efficient, cudnn; then the rest)
    cudnn-benchmark   as fast, captured with torch.backends.cudnn.benchmark on (cuDNN times its algorithms)
    MODULE.NAME=V     as fast, with a constant of pare/fast/kernels/MODULE.py (or pare/fast/MODULE.py) set to V
                      (`--set`, repeatable)
`--only` keeps the named variants (and fast), so one option can be A/B'd without the rest.
The figures feed benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch


@contextlib.contextmanager
def constant(module: str, name: str, value):
    try:  # a kernel's constant (kernels/MODULE.py), or a fast module's (pare/fast/MODULE.py)
        mod = importlib.import_module(f"pare.fast.kernels.{module}")
    except ModuleNotFoundError:
        mod = importlib.import_module(f"pare.fast.{module}")
    old = getattr(mod, name)  # an unknown name fails here, before anything is measured
    setattr(mod, name, int(value) if isinstance(old, bool) else type(old)(value))  # bool("0") would be True
    try:
        yield
    finally:
        setattr(mod, name, old)


@contextlib.contextmanager
def sdpa_first(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION}
    order = [names[backend]] + [b for b in names.values() if b != names[backend]] + [SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


@contextlib.contextmanager
def cudnn_benchmark():
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def main() -> None:
    from pare.bench import environment, workloads
    from pare.bench.timing import in_cuda_graph, time_ms
    from pare.fast import optimize_model
    from pare.fast.transformer import FastBasicTransformerBlock, FastTransformer2DModel
    from pare.models.transformer import BasicTransformerBlock
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15")
    parser.add_argument("--cases", default="unet")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=V1,V2")
    parser.add_argument("--only", default=None, metavar="V1,V2",
                        help="run only these variants (and fast): names as printed, e.g. no-block-fusion,geglu.FUSED_GEMM=0")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ref, device = import_reference(None), torch.device("cuda")
    header = {**environment(device, ref.__version__), "dtype": "float16", "command": " ".join(["python"] + sys.argv)}
    print(header, flush=True)
    results = {**header, "cases": {}}

    @contextlib.contextmanager
    def no_block_fusion(model):
        blocks = [m for m in model.modules() if isinstance(m, FastBasicTransformerBlock)]
        for m in blocks:
            m.__class__ = BasicTransformerBlock
        try:
            yield
        finally:
            for m in blocks:
                m.__class__ = FastBasicTransformerBlock

    @contextlib.contextmanager
    def no_stack_fusion(model):  # a no-op hook on each block: the transformer then calls them one by one
        handles = [b.register_forward_hook(lambda *_: None) for m in model.modules()
                   if isinstance(m, FastTransformer2DModel) for b in m.transformer_blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    kept = []  # the weights earlier graphs read: a variant that restacks must not free them

    @contextlib.contextmanager
    def own_stacks(model):
        from pare.fast.optimize import share_context

        transformers = [m for m in model.modules() if isinstance(m, FastTransformer2DModel)]
        kept.append([t._context for t in transformers])
        for t in transformers:
            t.fuse()
        try:
            yield
        finally:
            kept.append([t._context for t in transformers])
            share_context(model)

    @contextlib.contextmanager
    def proj_in_bias_pass(model):  # a no-op hook on proj_in: it then runs as a module, with its bias
        handles = [m.proj_in.register_forward_hook(lambda *_: None) for m in model.modules()
                   if isinstance(m, FastTransformer2DModel) and not m.use_linear_projection]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    for family in args.models.split(","):
        for case in args.cases.split(","):
            w = workloads.build(ref, family, case, device, torch.float16, args.batch)
            model = optimize_model(w.ours)
            call = lambda: w.call_ours(model)  # noqa: E731
            variants = {"fast": contextlib.nullcontext, "cudnn-benchmark": cudnn_benchmark}
            if any(isinstance(m, FastBasicTransformerBlock) for m in model.modules()):
                variants["no-block-fusion"] = lambda: no_block_fusion(model)
            if any(isinstance(m, FastTransformer2DModel) and len(m.transformer_blocks) > 1 for m in model.modules()):
                variants["no-stack-fusion"] = lambda: no_stack_fusion(model)
            transformers = [m for m in model.modules() if isinstance(m, FastTransformer2DModel)]
            if len({id(t._context[0]) for t in transformers if t._context}) == 1 < len(transformers):
                variants["own-stacks"] = lambda: own_stacks(model)
            if any(not t.use_linear_projection for t in transformers):
                variants["proj-in-bias-pass"] = lambda: proj_in_bias_pass(model)
            if any(isinstance(m, FastBasicTransformerBlock) for m in model.modules()):
                variants.update({f"sdpa={b}": lambda b=b: sdpa_first(b) for b in ("flash", "cudnn")})
            for spec in args.set:
                target, values = spec.split("=")
                module, name = target.split(".")
                for v in values.split(","):
                    variants[f"{target}={v}"] = lambda m=module, n=name, v=v: constant(m, n, v)
            if args.only:
                keep = {"fast", *args.only.split(",")}
                variants = {k: v for k, v in variants.items() if k in keep}
            graphs = {}
            with torch.no_grad():
                for name, context in variants.items():
                    with context():
                        graphs[name] = in_cuda_graph(call, device)
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
