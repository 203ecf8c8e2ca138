"""The combined sweep report: every case in spec order, its verdict and first failure, and all its rows.

Written by rank 0 as Markdown (a table of cases, then the first failure of each failing case in
full), JSON (the header, then per case its rows as `pare parity --out` writes them) and a PNG heat
map of cases x blocks (`heatmap.py`). The rows do not depend on the world size; only each case's
`run` entry (rank, device, seconds) and the header's timing do.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import CaseResult


@dataclass
class SweepReport:
    header: dict
    results: list[CaseResult]  # in spec order

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n, rows = len(self.results), sum(len(r.rows) for r in self.results)
        if self.passed:
            return f"PASS: all {n} cases ({rows} rows) within tolerance"
        crashed = sum(r.error is not None for r in self.failed)
        return (f"FAIL: {len(self.failed)} of {n} cases failed ({crashed} crashed); "
                f"first: {self.failed[0].case.label}: {failure_text(self.failed[0])}")

    def as_dict(self) -> dict:
        return {"header": self.header, "summary": self.summary(), "cases": [r.as_dict() for r in self.results]}


def make_header(*, spec, world_size: int, devices: list[str], reference, seconds: float) -> dict:
    import pare

    return {"devices": sorted(set(devices)), "world_size": world_size, "host": platform.node(),
            "torch": torch.__version__, "diffusers": getattr(reference, "__version__", "?"),
            "diffusers_path": str(Path(reference.__file__).parent), "pare": pare.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(seconds, 2), "spec": spec.as_dict()}


def failure_text(result: CaseResult) -> str:
    if result.error is not None:
        return f"crashed: {result.error}"
    first = result.first_failure
    return "—" if first is None else f"{first[0]} {first[1].name} ({first[1].reason})"


def _case_line(result: CaseResult) -> list[str]:
    c = result.case
    return [str(c.index), c.label, str(len(result.rows)), result.verdict, f"{result.worst:.2e}",
            "—" if result.passed else failure_text(result), f"{result.seconds:.1f}", str(result.rank)]


COLUMNS = ["#", "case", "rows", "verdict", "worst error / limit", "first failure", "seconds", "rank"]


def to_text(report: SweepReport, verbose: bool = False) -> str:
    """The summary and the failing cases (every case with `verbose`), one line each."""
    h = report.header
    shown = report.results if verbose else report.failed
    lines = [f"pare sweep: {len(report.results)} cases on {h['world_size']} rank(s) ({', '.join(h['devices'])}), "
             f"{h['wall_seconds']:.1f} s | diffusers {h['diffusers']} ({h['diffusers_path']})"]
    if shown:
        lines += ["", "every case:" if verbose else "failing cases (the first failure of each):"]
        lines += [f"  {r.case.index}: {r.case.label}: {r.verdict} ({len(r.rows)} rows, {r.seconds:.1f} s, rank {r.rank})"
                  + ("" if r.passed else f": {failure_text(r)}") for r in shown]
    return "\n".join(lines + ["", report.summary()])


def to_markdown(report: SweepReport, heatmap_name: str | None = None) -> str:
    h = report.header
    keys = [k for k in h if k != "spec"]
    spec = ", ".join(f"{k} = {v}" for k, v in h["spec"].items() if v is not None)
    out = [f"# Parity sweep: {len(report.results)} cases", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
           "| " + " | ".join(str(h[k]) for k in keys) + " |", "", f"Spec: {spec}.", "",
           f"**{report.summary()}**", "",
           "Each case is one `pare parity` run of one component; *worst error / limit* is the largest of its rows' "
           "local and accumulated errors over their tolerance (below fp32 the err64 budget, else rel L2): "
           "1 or more fails.", ""]
    if heatmap_name is not None:
        out += [f"![cases x blocks, coloured by worst error / limit]({heatmap_name})", ""]
    out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _case_line(r)) + " |" for r in report.results]
    if report.failed:
        out += ["", "## First failure of each failing case", ""]
        for r in report.failed:
            first = r.first_failure
            detail = r.error if first is None else f"{first[0]}: {first[1]}"
            out += [f"### {r.case.index}: {r.case.label}", "", "```", detail, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def write(report: SweepReport, stem: str | Path) -> list[Path]:
    """STEM.md, STEM.json and (with matplotlib) STEM.png, each written atomically."""
    from ..atomic import write_text_atomically
    from .heatmap import heatmap

    stem = Path(stem)
    md, js, png = stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png")
    drawn = heatmap(report, png)
    write_text_atomically(js, json.dumps(report.as_dict(), indent=1, default=str))
    write_text_atomically(md, to_markdown(report, None if drawn is None else png.name))
    return [md, js] + ([png] if drawn is not None else [])
