"""A parity report: rows of `Comparison`s in execution order, with a header saying how they were made.

Written as a table to the terminal, and as JSON and Markdown files. Used by `pare parity`.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compare import Comparison


@dataclass
class Report:
    header: dict
    rows: list[tuple[str, Comparison]] = field(default_factory=list)  # (component, comparison)

    def add(self, component: str, rows: list[Comparison]) -> None:
        self.rows += [(component, r) for r in rows]

    @property
    def first_failure(self) -> tuple[str, Comparison] | None:
        return next(((c, r) for c, r in self.rows if not r.passed), None)

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
                "rows": [{"component": c, **r.as_dict()} for c, r in self.rows]}


def make_header(*, model: str, device: torch.device, dtype: str, seed: int, reference) -> dict:
    import pare

    return {
        "model": model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "diffusers": getattr(reference, "__version__", "?"),
        "diffusers_path": str(Path(reference.__file__).parent),
        "pare": pare.__version__,
        "dtype": dtype,
        "seed": seed,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2e}"


COLUMNS = ("component", "block", "shape", "max abs", "rel L2", "cos dist", "pare err64", "diffusers err64", "verdict")


def _cells(component: str, r: Comparison) -> list[str]:
    return [component, r.name, "x".join(map(str, r.shape)), _fmt(r.max_abs), _fmt(r.rel_l2), _fmt(r.cos_dist),
            _fmt(r.pare_err64), _fmt(r.diffusers_err64), "PASS" if r.passed else "FAIL"]


def to_text(report: Report) -> str:
    table = [list(COLUMNS)] + [_cells(c, r) for c, r in report.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:] + ["", report.summary()])


def to_markdown(report: Report) -> str:
    h = report.header
    out = [f"# Parity report: {h['model']}", "",
           "| " + " | ".join(f"{k}" for k in h) + " |", "|" + "---|" * len(h), "| " + " | ".join(str(v) for v in h.values()) + " |",
           "", f"**{report.summary()}**", "",
           "Tolerances: `pare/parity/tolerances.py` (fp32: rel L2 ≤ 1e-5 per block, 1e-4 end to end; fp16/bf16: "
           "pare's error against float64 ≤ 1.25 × diffusers' + one unit roundoff, and rel L2 to diffusers ≤ 1e-2).", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cells(c, r)) + " |" for c, r in report.rows]
    return "\n".join(out) + "\n"


def write(report: Report, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return [md, js]
