"""One sweep case, run: a `pare parity` report for one (config, dtype, seed, component, scheduler), or the error
that stopped it.

A case that raises (an out-of-memory, a diffusers tree that fails to import a class, a scheduler
that refuses the config) becomes a failed result carrying the error, not a lost sweep. Each case
starts from `torch.manual_seed(seed)`, so its rows do not depend on which cases ran before it in
the same process: a case gives the same rows on any rank, at any world size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..parity.compare import Row
from ..parity.report import Report, severity
from .spec import Case, Spec


@dataclass
class CaseResult:
    case: Case
    rows: list[tuple[str, Row]] = field(default_factory=list)  # (component, row), as in a parity Report
    error: str | None = None  # "ExceptionType: message" when the case crashed
    seconds: float = 0.0
    rank: int = 0
    device: str = "cpu"

    @property
    def passed(self) -> bool:
        return self.error is None and all(r.passed for _, r in self.rows)

    @property
    def first_failure(self) -> tuple[str, Row] | None:
        """The parity report's first failure: the first failing local row, else the first failing accumulated one."""
        return Report(header={}, rows=self.rows).first_failure

    @property
    def worst(self) -> float:
        """The largest error over its limit in the case (>= 1 fails); see `pare.parity.report.severity`."""
        return max((max(severity(r.local), severity(r.accumulated)) for _, r in self.rows), default=0.0)

    @property
    def verdict(self) -> str:
        return "CRASHED" if self.error is not None else ("PASS" if self.passed else "FAIL")

    def as_dict(self) -> dict:
        first = self.first_failure
        return {"case": self.case.as_dict(), "passed": self.passed, "verdict": self.verdict, "error": self.error,
                "first_failure": None if first is None else {"component": first[0], "name": first[1].name,
                                                             "reason": first[1].reason},
                "rows": [{"component": c, **r.as_dict()} for c, r in self.rows],
                "run": {"rank": self.rank, "device": self.device, "seconds": round(self.seconds, 3)}}


class Checkpoints:
    """The random-init checkpoint of the cases at hand, made once per (config, seed, dtype) and reused by the
    components and schedulers that follow it. Only the latest is kept: an official SDXL folder is gigabytes."""

    def __init__(self):
        self.key, self.tmp, self.folder = None, None, None

    def get(self, reference, case: Case, device: torch.device) -> Path:
        from ..parity.checkpoint import make_checkpoint
        from ..parity.tolerances import DTYPES

        key = (case.config, case.seed, case.dtype)
        if key != self.key:
            self.close()
            self.tmp = tempfile.TemporaryDirectory(prefix="pare-sweep-")
            # as `pare parity` does: weights stored in the run's precision, seeded by the case's seed
            self.folder = make_checkpoint(reference, Path(self.tmp.name), case.config, case.seed, device,
                                          DTYPES[case.dtype])
            self.key = key
        return self.folder

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
        self.key = self.tmp = self.folder = None


def parity_args(spec: Spec, case: Case, model: str, device: torch.device) -> argparse.Namespace:
    """The `pare parity` arguments of one case (its parser's defaults for everything the spec does not set)."""
    from ..parity import run as parity

    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    args = parser.parse_args([])
    args.model, args.config, args.device = model, case.config or args.config, device.type  # "cuda": the pinned GPU
    args.dtype, args.seed, args.steps, args.depth = case.dtype, case.seed, spec.steps, spec.depth
    args.components, args.schedulers, args.reference_path = case.component, case.scheduler, spec.reference_path
    args.fast = spec.fast
    return args


def one_line(error: BaseException) -> str:
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run_case(case: Case, spec: Spec, reference, device: torch.device, checkpoints: Checkpoints,
             rank: int = 0) -> CaseResult:
    """`pare parity` for one case; an exception becomes the result's error (KeyboardInterrupt still stops)."""
    from ..parity.run import make_report

    start = time.perf_counter()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.manual_seed(case.seed)
    try:
        model = spec.model or str(checkpoints.get(reference, case, device))
        with torch.no_grad():
            rows = make_report(parity_args(spec, case, model, device)).rows
        return CaseResult(case, rows, None, time.perf_counter() - start, rank, device_name)
    except (Exception, SystemExit) as e:  # pare parity's own checks end with SystemExit
        return CaseResult(case, [], one_line(e), time.perf_counter() - start, rank, device_name)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
