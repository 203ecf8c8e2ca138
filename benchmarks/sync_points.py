"""Where a pipeline call waits for the GPU: every synchronising op of one fast text-to-image call, with
the line of pare that made it (torch.cuda.set_sync_debug_mode), counted.

    python benchmarks/sync_points.py --model sd15 --steps 5

A host sync in the denoising loop stops the CPU from queueing the next step while the GPU works:
the step then costs the GPU time plus the CPU time, not the larger of the two.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings

import torch


def main() -> None:
    from pare.bench import environment, workloads
    from pare.parity.reference import import_reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-fast", action="store_true")
    args = parser.parse_args()
    ref = import_reference(None)
    print({**environment(torch.device("cuda"), ref.__version__), "command": " ".join(["python"] + sys.argv)}, flush=True)
    w = workloads.build(ref, args.model, "pipeline", torch.device("cuda"), torch.float16, steps=args.steps)
    if not args.no_fast:
        w.ours.enable_fast()
    with torch.no_grad():
        w.call_ours(w.ours)  # warm-up: graph capture, Triton compiles
        torch.cuda.synchronize()
        sites = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None):
            stack = [f for f in traceback.extract_stack()[:-1] if "/pare/" in f.filename]
            sites[" <- ".join(f"{f.filename.split('/pare/')[-1]}:{f.lineno} {f.line}" for f in stack[-2:][::-1])] += 1

        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.simplefilter("always")  # every occurrence, not once per line
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                w.call_ours(w.ours)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(sites.values())} synchronising ops in one {args.steps}-step call of {w.name}:")
    for site, n in sites.most_common():
        print(f"{n:5d}  {site}")


if __name__ == "__main__":
    main()
