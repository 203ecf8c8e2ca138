"""`pare bench`: latency and memory of pare beside diffusers (see timing.py for what is measured)."""

from __future__ import annotations

import argparse
import datetime
import subprocess
from pathlib import Path

import torch

from ..parity.reference import import_reference
from ..parity.tolerances import DTYPES
from . import report, workloads
from .timing import LIBRARIES, MODES, Run, bench_case, matmul_peak_flops


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "n/a"


def environment(device: torch.device, reference_version: str) -> dict:
    """What a measurement ran on: device, driver, library versions and the date, for every results file."""
    import importlib.metadata

    import pare

    cuda = device.type == "cuda"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "n/a"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "driver": _driver() if cuda else "n/a",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton, "diffusers": reference_version, "pare": pare.__version__,
            "date": datetime.date.today().isoformat()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help=f"comma list of {list(workloads.FAMILIES)} "
                        "(default: sd15 on CUDA, tiny on CPU)")
    parser.add_argument("--cases", default=",".join(workloads.CASES),
                        help=f"comma list of {workloads.CASES} (the default) and {workloads.EXTRA_CASES}")
    parser.add_argument("--modes", default=None, help=f"comma list of {MODES} (default: eager,graph on CUDA, eager on CPU)")
    parser.add_argument("--batches", default="1,2", help="UNet batch sizes (2 = classifier-free guidance)")
    parser.add_argument("--steps", type=int, default=workloads.PIPELINE_STEPS,
                        help=f"denoising steps of the pipeline case (default {workloads.PIPELINE_STEPS}, diffusers' default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per case (default 30 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per case (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--reference-path", default=None, help="a diffusers checkout to compare against")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--stem", default=None, help="file name stem (default: bench-<device>-<dtype>)")


def run(args: argparse.Namespace) -> list[Path]:
    from tqdm import tqdm

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    families = (args.models or ("sd15" if cuda else "tiny")).split(",")
    modes = tuple((args.modes or ("eager,graph" if cuda else "eager")).split(","))
    cases = args.cases.split(",")
    for name, values, allowed in (("model", families, workloads.FAMILIES), ("mode", modes, MODES),
                                  ("case", cases, workloads.CASES + workloads.EXTRA_CASES)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise SystemExit(f"pare bench: unknown {name} {unknown}; expected some of {list(allowed)}")
    iters, warmup = args.iters or (30 if cuda else 3), args.warmup or (5 if cuda else 1)
    ref = import_reference(args.reference_path)

    peak = matmul_peak_flops(device, dtype)
    header = {**environment(device, ref.__version__), "dtype": str(dtype).replace("torch.", ""),
              "matmul_tflops": peak / 1e12, "iters": iters, "warmup": warmup}
    result = Run(header)
    stem = args.stem or f"bench-{header['device'].replace(' ', '_')}-{header['dtype']}"
    plan = [(f, c, b) for f in families for c in cases for b in (map(int, args.batches.split(",")) if c in ("unet", "controlnet-step") else [1])]
    for family, case, batch in tqdm(plan, desc="pare bench", unit="case"):
        w = workloads.build(ref, family, case, device, dtype, batch, args.steps)
        case_modes = modes if w.graphable else tuple(m for m in modes if m == "eager" or (m == "fast" and w.fast))
        # Full pipelines take fewer runs by default (seconds each); --iters/--warmup given apply to every case.
        case_warmup = args.warmup or (w.runs[0] if w.runs else warmup)
        case_iters = args.iters or (w.runs[1] if w.runs else iters)
        for library, model, call in (("pare", w.ours, w.call_ours), ("diffusers", w.theirs, w.call_theirs)):
            bench_case(result, w.name, library, model, call, case_modes, device, peak, case_warmup, case_iters,
                       tqdm.write, w.stages, w.graphable)
        del w
        if cuda:
            torch.cuda.empty_cache()
        paths = report.write(result, Path(args.out), stem)  # after every case: a cut-off run keeps what it measured
    print(report.to_markdown(result))
    return paths


__all__ = ["LIBRARIES", "MODES", "add_arguments", "run"]
