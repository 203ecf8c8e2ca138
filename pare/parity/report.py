"""A parity report: rows in execution order, each with a local and an accumulated comparison, and a header.

Written to the terminal (a summary and the worst rows, fitted to its width; every row with
`--verbose`), and as Markdown, JSON and a PNG of the error against execution order (`plot.py`).
Used by `pare parity`.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compare import Comparison, Row
from .tolerances import TOLERANCES


@dataclass
class Report:
    header: dict
    rows: list[tuple[str, Row]] = field(default_factory=list)  # (component, row)

    def add(self, component: str, rows: list[Row]) -> None:
        self.rows += [(component, r) for r in rows]

    @property
    def first_failure(self) -> tuple[str, Row] | None:
        """The first row whose own (local) error fails, which names the edited block; failing that,
        the first row whose accumulated error fails."""
        return (next(((c, r) for c, r in self.rows if not r.local.passed), None)
                or next(((c, r) for c, r in self.rows if not r.passed), None))

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def summary(self) -> str:
        n_fail = sum(not r.passed for _, r in self.rows)
        if self.passed:
            return f"PASS: all {len(self.rows)} rows within tolerance"
        component, row = self.first_failure
        return f"FAIL: {n_fail} of {len(self.rows)} rows out of tolerance; first: {component} {row.name} ({row.reason})"

    def as_dict(self) -> dict:
        return {"header": self.header, "summary": self.summary(),
                "first_failure": None if self.passed else {"component": self.first_failure[0],
                                                           "name": self.first_failure[1].name},
                "rows": [{"component": c, **r.as_dict()} for c, r in self.rows]}


def make_header(*, model: str, device: torch.device, dtype: str, seed: int, reference, depth: str = "blocks") -> dict:
    import pare

    return {
        "model": model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "diffusers": getattr(reference, "__version__", "?"),
        "diffusers_path": str(Path(reference.__file__).parent),
        "pare": pare.__version__,
        "dtype": dtype,
        "depth": depth,
        "seed": seed,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def severity(c: Comparison | None) -> float:
    """How close a comparison is to failing: its error over its limit (>= 1 fails; inf for NaN)."""
    if c is None:
        return 0.0
    if not c.passed and "non-finite" in c.reason:
        return float("inf")
    ratios = [c.rel_l2 / c.tolerance.rel_l2 if c.tolerance.rel_l2 > 0 else (float("inf") if c.rel_l2 > 0 else 0.0)]
    if c.tolerance.budget is not None and c.pare_err64 is not None:
        ratios.append(c.pare_err64 / (c.tolerance.budget * c.diffusers_err64 + c.tolerance.floor))
    return max(ratios)


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2e}"


def _columns(report: Report) -> list[str]:
    budget = any(r.local.pare_err64 is not None for _, r in report.rows)
    cols = ["component", "block", "shape", "local rel L2", "accum. rel L2"]
    if budget:
        cols += ["local err64 pare/diffusers", "accum. err64 pare/diffusers"]
    return cols + ["verdict"]


def _cells(component: str, r: Row, budget: bool) -> list[str]:
    acc = r.accumulated
    cells = [component, r.name, "x".join(map(str, r.shape)), _fmt(r.local.rel_l2), _fmt(None if acc is None else acc.rel_l2)]
    if budget:
        cells.append(f"{_fmt(r.local.pare_err64)} / {_fmt(r.local.diffusers_err64)}")
        cells.append("—" if acc is None else f"{_fmt(acc.pare_err64)} / {_fmt(acc.diffusers_err64)}")
    return cells + ["PASS" if r.passed else ("FAIL" if not r.local.passed else "FAIL (accum.)")]


def shorten(text: str, width: int) -> str:
    """Cut the middle out of a long block name, keeping both ends: `down_bl…transformer_blocks.0`.

    The end says which block it is, so it keeps two thirds."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _table(report: Report, rows: list[tuple[str, Row]], width: int) -> list[str]:
    cols = _columns(report)
    budget = len(cols) > 6
    table = [cols] + [_cells(c, r, budget) for c, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    others = sum(w for i, w in enumerate(widths) if i != 1) + 2 * (len(cols) - 1)
    widths[1] = max(12, min(widths[1], width - others))  # the block name takes what the terminal leaves
    lines = ["  ".join(shorten(cell, w).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return lines[:1] + ["-" * min(width, max(len(line) for line in lines))] + lines[1:]


def to_text(report: Report, verbose: bool = False, width: int | None = None, worst: int = 8) -> str:
    """Every row with `verbose`; else the failing rows (or the worst ones on a pass) and the summary."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    h = report.header
    head = (f"pare parity: {h['model']} | {h['device']} | {h['dtype']} | depth {h.get('depth', 'blocks')} | "
            f"diffusers {h['diffusers']} ({h['diffusers_path']})")
    if verbose:
        shown, title = report.rows, "every row, in execution order:"
    elif report.passed:
        ranked = sorted(report.rows, key=lambda cr: -max(severity(cr[1].local), severity(cr[1].accumulated)))
        shown, title = ranked[:worst], f"the {min(worst, len(ranked))} rows nearest their limit:"
    else:
        failing = [cr for cr in report.rows if not cr[1].passed]
        shown = failing[: 2 * worst]
        title = f"failing rows in execution order ({len(shown)} of {len(failing)}; --verbose shows every row):"
    lines = [shorten(head, width), "", title, *_table(report, shown, width), "", report.summary()]
    if not report.passed:
        component, row = report.first_failure
        lines += ["", f"first failure ({component}):", str(row)]
    return "\n".join(lines)


def describe_tolerances() -> str:
    """The tolerance table in one line, from the table itself."""
    parts = []
    for dtype in ("fp64", "fp32", "fp16", "bf16"):
        block, e2e = TOLERANCES[(dtype, "block")], TOLERANCES[(dtype, "end_to_end")]
        if block.budget is None:
            parts.append(f"{dtype}: rel L2 ≤ {block.rel_l2:.0e} local, {e2e.rel_l2:.0e} accumulated")
        else:
            parts.append(f"{dtype}: err64(pare) ≤ {block.budget} × err64(diffusers) + {block.floor:.2e}, "
                         f"and rel L2 ≤ {block.rel_l2:.0e}")
    return "; ".join(parts)


def to_markdown(report: Report) -> str:
    h = report.header
    cols = _columns(report)
    budget = len(cols) > 6
    out = [f"# Parity report: {h['model']}", "",
           "| " + " | ".join(f"{k}" for k in h) + " |", "|" + "---|" * len(h), "| " + " | ".join(str(v) for v in h.values()) + " |",
           "", f"**{report.summary()}**", "",
           "*local*: pare's block (or step) run on the very inputs diffusers' got, judged at block tolerance; "
           "*accumulated*: each side on its own upstream activations, judged at end-to-end tolerance. "
           f"Tolerances (`pare/parity/tolerances.py`): {describe_tolerances()}.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cells(c, r, budget)) + " |" for c, r in report.rows]
    return "\n".join(out) + "\n"


def write(report: Report, stem: str | Path) -> list[Path]:
    from ..atomic import write_text_atomically
    from .plot import plot

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, js, png = stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png")
    write_text_atomically(md, to_markdown(report))
    write_text_atomically(js, json.dumps(report.as_dict(), indent=2, default=str))
    return [md, js] + ([png] if plot(report, png) is not None else [])
