"""Where a model's GPU time goes: kernel time by class (conv, GEMM, attention, norms, elementwise) under a CUDA graph.

    python benchmarks/profile_kernels.py --models sd15,sdxl --cases unet,vae-decode --modes graph,fast --out DIR
    python benchmarks/profile_kernels.py --models sdxl --modes fast --who "_to_copy|copy_|cat"   # who calls them

Each (model, case, mode) is captured in one CUDA graph (`pare.bench.timing.in_cuda_graph`), replayed
under the torch profiler, and its kernels summed by class from their names. pare's models only:
diffusers launches the same kernels as pare's reference modules (the README's parity reports).
This is the table of benchmarks/NOTES.md.

`--who PATTERN` runs each model once more, eagerly, and names the lines of pare that call the aten ops
whose names match PATTERN (`_to_copy|cat|add`), with their counts: where a stray copy comes from.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

# Kernel-name patterns per class, first match wins (cuDNN, cuBLAS/CUTLASS, flash/cuDNN attention, Triton).
CLASSES = [
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("group norm", r"group_norm|groupnorm|_group_norm_triton|stats|finalize|^apply"),
    ("layer norm", r"layer_norm|layernorm"),
    ("geglu", r"geglu"),
    ("conv", r"conv|fprop|dgrad|implicit|winograd|cudnn|nhwc|nchw"),
    ("gemm", r"gemm|cutlass|cublas|nvjet|sm90_xmma|matmul|wgmma"),
    ("elementwise", r"."),
]


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "elementwise"


def profile(fn, replays: int = 10, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    time_us, count = defaultdict(float), defaultdict(int)
    names, name_count = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        label = kernel_class(event.name)
        time_us[label] += event.device_time / replays
        count[label] += 1 / replays
        names[event.name] += event.device_time / replays
        name_count[event.name] += 1
    ranked = sorted(names.items(), key=lambda kv: -kv[1])[:top]
    return {"ms": {k: v / 1e3 for k, v in time_us.items()}, "kernels": {k: round(v) for k, v in count.items()},
            "total_ms": sum(time_us.values()) / 1e3,
            "top": [(n[:120], us / 1e3, round(name_count[n] / replays)) for n, us in ranked]}  # (name, ms, launches)


def launchers(fn, pattern: str, depth: int = 2) -> list:
    """[(count, aten op, the innermost pare frames that called it)] for the ops of one eager call whose names match
    `pattern`: where a stray copy or add comes from. (The profiler's own stacks came back empty on the device.)"""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found = defaultdict(int)

    class Who(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            if re.search(pattern, name):
                frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                          if "/pare/" in f.filename][-depth:]
                found[(name, " < ".join(reversed(frames)))] += 1
            return func(*args, **(kwargs or {}))

    with Who():
        fn()
    return sorted(((n, *k) for k, n in found.items()), reverse=True)


def main() -> None:
    from pare.bench import workloads
    from pare.bench.timing import prepare, undo
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15")
    parser.add_argument("--cases", default="unet")
    parser.add_argument("--modes", default="graph,fast", help="graph (the reference modules) and/or fast")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="kernel names kept, by time")
    parser.add_argument("--who", default=None, metavar="PATTERN", help="name the lines that call these aten ops")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ref = import_reference(None)
    device, dtype = torch.device("cuda"), torch.float16
    from pare.bench import environment

    header = {**environment(device, ref.__version__), "dtype": "float16",
              "command": "python benchmarks/profile_kernels.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    print(header, flush=True)
    results = []
    for family in args.models.split(","):
        for case in args.cases.split(","):
            w = workloads.build(ref, family, case, device, dtype, args.batch)
            for mode in args.modes.split(","):
                with torch.no_grad():
                    fn, setup_s, _ = prepare(mode, w.ours, w.call_ours, device)
                    row = {"case": w.name, "mode": mode, **profile(fn, top=args.top)}
                    if args.who:
                        row["who"] = launchers(lambda: w.call_ours(w.ours), args.who)  # eager: the ops are seen
                        for line in row["who"]:
                            print(*line, sep="  |  ")
                    undo(mode, w.ours)
                results.append(row)
                cells = " ".join(f"{k} {v:.2f} ({row['kernels'][k]})" for k, v in sorted(row["ms"].items()))
                print(f"{w.name:<24} {mode:<6} total {row['total_ms']:.2f} ms: {cells}", flush=True)
                if args.out:
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    (Path(args.out) / "profile.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
            del w
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
