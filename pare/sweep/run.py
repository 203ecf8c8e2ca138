"""`pare sweep`: the cases of a spec, a deterministic share on each torchrun rank, gathered into one report.

    pare sweep sweep.toml --out sweep                       # serially: this machine's GPU, or its CPU
    torchrun --nproc-per-node 4 -m pare.cli sweep sweep.toml --out sweep     # one rank per GPU
    pare sweep --configs tiny,tiny-sdxl --dtypes fp32,fp64 --seeds 0,1 --schedulers all --steps 10

1. Read the spec (a TOML or YAML file; flags override its keys) and list its cases in spec order.
2. Join torchrun's process group, if there is one; pin this rank to the GPU of its LOCAL_RANK.
3. Run this rank's share (`assign.py`: deterministic, balanced by estimated cost, a checkpoint's cases
   kept on one rank where that pays), each case one `pare parity` run; a case that raises is a failed
   case with its error.
4. With --out, write this rank's cases to OUT.rank{R}.json, so a hung rank loses only its own.
   Meet at a barrier (a rank missing after --timeout seconds is named in the error), gather every
   rank's results on rank 0 (`gather_object`), put them back in spec order, and write one report:
   OUT.md, OUT.json and OUT.png, the heat map of cases x blocks. Exit 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import distributed
from .assign import assign
from .cases import Checkpoints, run_case
from .report import SweepReport, make_header, to_text, write
from .spec import AXES, SETTINGS, expand, make_spec, read_spec_file


def read_spec(args: argparse.Namespace):
    """The spec file's keys with the flags given laid over them, checked; where names both, for the errors."""
    raw = read_spec_file(args.spec) if args.spec is not None else {}
    flags = {key: getattr(args, key) for key in AXES + SETTINGS if getattr(args, key) is not None}
    if "model" in flags:
        raw.pop("configs", None)  # --model on the command line replaces the spec's configs
    if "configs" in flags:
        raw.pop("model", None)
    where = " and ".join(filter(None, [args.spec, "the flags" if flags else None])) or "the defaults"
    return make_spec({**raw, **flags}, where=where)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..parity.reference import import_reference

    started = time.perf_counter()
    try:
        spec = read_spec(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # a bad spec is a usage error: exit 2
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive (seconds), got {args.timeout:g}")
    world, device = distributed.init(spec.device, args.timeout)
    try:
        cases = expand(spec, device.type)
        mine = assign(cases, world.size, spec.steps, model_given=spec.model is not None)[world.rank]
        reference = import_reference(spec.reference_path)
        quiet(reference)
        checkpoints, results = Checkpoints(), []
        try:
            for n, case in enumerate(mine, 1):
                result = run_case(case, spec, reference, device, checkpoints, world.rank)
                results.append(result)
                detail = f": {result.error}" if result.error else ""
                print(f"[{world}] case {n}/{len(mine)} (#{case.index} of {len(cases)}) {case.label}: "
                      f"{result.verdict} ({len(result.rows)} rows, {result.seconds:.1f} s){detail}", flush=True)
        finally:
            checkpoints.close()
        part = write_part(results, args.out, world) if args.out and world.distributed else None
        try:
            distributed.barrier(world, "the end of the sweep")
        except distributed.RankTimeoutError as e:
            if part is not None:
                raise distributed.RankTimeoutError(f"{e}; the cases of the ranks that finished are in "
                                                   f"{args.out}.rank*.json") from e
            raise
        gathered = distributed.gather_object(results, world)
        if not world.is_main:
            return 0  # rank 0 reports, and its exit code is the sweep's
        merged = sorted((r for part in gathered for r in part), key=lambda r: r.case.index)
        if [r.case.index for r in merged] != list(range(len(cases))):
            raise RuntimeError(f"the ranks returned cases {[r.case.index for r in merged]}, expected 0..{len(cases) - 1}")
        header = make_header(spec=spec, world_size=world.size, devices=[r.device for r in merged],
                             reference=reference, seconds=time.perf_counter() - started)
        report = SweepReport(header, merged)
        print(to_text(report, verbose=args.verbose))
        if args.out:
            for path in write(report, args.out):
                print(f"wrote {path}")
            for part in Path(args.out).parent.glob(f"{Path(args.out).name}.rank*.json"):
                part.unlink()  # in the combined report now
        return 0 if report.passed else 1
    finally:
        distributed.shutdown(world)


def write_part(results, out: str, world) -> Path:
    """This rank's cases, as the report's JSON has them, in OUT.rank{R}.json: if another rank hangs, the finished
    ranks' work is on disk (rank 0 removes the parts once the combined report is written)."""
    from ..atomic import write_text_atomically

    path = Path(f"{out}.rank{world.rank}.json")
    return write_text_atomically(path, json.dumps({"rank": world.rank, "cases": [r.as_dict() for r in results]},
                                                  default=str))


def quiet(reference) -> None:
    """No loading and saving progress bars from diffusers and transformers: one line per case is the sweep's output."""
    import transformers

    for library in (reference, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=None,
                        help="a TOML file (or YAML, with PyYAML) of axes and settings; flags override its keys")
    axes = parser.add_argument_group("axes (comma lists; each overrides the spec's)")
    axes.add_argument("--configs", default=None, help="pare parity --config names (default tiny)")
    axes.add_argument("--dtypes", default=None, help="fp32, fp16, bf16, fp64 (default: pare parity's)")
    axes.add_argument("--seeds", default=None, help="integers (default 0)")
    axes.add_argument("--schedulers", default=None,
                      help="scheduler classes, or 'all', for the scheduler and pipeline components "
                           "(default: the folder's own)")
    axes.add_argument("--components", default=None, help="unet, vae, scheduler, pipeline (default), controlnet")
    settings = parser.add_argument_group("settings (as in pare parity)")
    settings.add_argument("--model", default=None, help="a pipeline folder or Hub id, instead of --configs")
    settings.add_argument("--reference-path", default=None, help="a diffusers source tree to compare against")
    settings.add_argument("--steps", type=int, default=None, help="scheduler and pipeline steps (default 50)")
    settings.add_argument("--depth", default=None, help="blocks (default) or all")
    settings.add_argument("--fast", action="store_const", const=True, default=None,
                          help="pare's side on its fast path (pare parity --fast; default: the spec's, else off)")
    settings.add_argument("--device", default=None,
                          help="cpu or cuda (default: cuda when available; under torchrun, the GPU of LOCAL_RANK)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a rank that has finished waits for the others before naming the missing ones "
                             "(default 1800)")
    parser.add_argument("--out", default=None, help="write OUT.md, OUT.json and OUT.png (cases x blocks)")
    parser.add_argument("--verbose", action="store_true", help="print every case (default: the failing ones)")
