"""The drift curve: a parity report's errors against execution order, as a PNG.

Top panel: relative L2 distance from pare to diffusers, local (same inputs) and accumulated
(each on its own upstream). Bottom panel, below float32: each side's error against float64,
the quantity the fp16/bf16 budget judges. Log scale; an exact zero (bit-identical outputs) is
drawn at the bottom of the axis. The first failure is marked. matplotlib is imported here only:
it is needed for the picture, not for parity.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..atomic import write_atomically

ZERO = 1e-18  # where an exact 0 is drawn on the log axis


def _series(report, view: str, attr: str) -> list[float]:
    values = []
    for _, row in report.rows:
        c = row.local if view == "local" or row.accumulated is None else row.accumulated
        v = getattr(c, attr)
        values.append(float("nan") if v is None else max(v, ZERO))
    return values


def plot(report, path: str | Path) -> Path | None:
    """Write the drift curve of `report` to `path`; returns the path, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"pare parity: {path} not written: the picture needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return None

    path = Path(path)
    budget = any(r.local.pare_err64 is not None for _, r in report.rows)
    fig, axes = plt.subplots(2 if budget else 1, 1, figsize=(13, 7.5 if budget else 4.5), sharex=True, squeeze=False)
    axes = axes[:, 0]
    x = list(range(len(report.rows)))
    ax = axes[0]
    ax.plot(x, _series(report, "local", "rel_l2"), ".-", lw=0.8, ms=3, label="local (same inputs)")
    ax.plot(x, _series(report, "accumulated", "rel_l2"), ".-", lw=0.8, ms=3, alpha=0.7, label="accumulated (own upstream)")
    ax.step(x, [max(r.local.tolerance.rel_l2, ZERO) for _, r in report.rows], where="mid", color="gray", ls="--",
            lw=0.8, label="local limit")
    ax.set_ylabel("rel L2, pare vs diffusers")
    if budget:
        ax = axes[1]
        for view, style in (("local", "-"), ("accumulated", ":")):
            ax.plot(x, _series(report, view, "pare_err64"), style, lw=1, label=f"pare err64, {view}")
            ax.plot(x, _series(report, view, "diffusers_err64"), style, lw=1, label=f"diffusers err64, {view}")
        ax.set_ylabel("rel L2 to float64")

    components = [c for c, _ in report.rows]
    first = report.first_failure
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylim(bottom=ZERO / 3)
        ax.grid(True, which="major", alpha=0.3)
        for i in range(1, len(components)):
            if components[i] != components[i - 1]:
                ax.axvline(i - 0.5, color="black", lw=0.6, alpha=0.5)
        if first is not None:
            ax.axvline(report.rows.index(first), color="red", lw=1.2, alpha=0.8)
        ax.legend(loc="center right", fontsize=7, ncol=2, framealpha=0.8)
    top = axes[0]
    starts = [i for i in range(len(components)) if i == 0 or components[i] != components[i - 1]]
    for i in starts:
        top.annotate(components[i], (i, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                     textcoords="offset points", fontsize=8)
    if first is not None:
        top.annotate(f"first failure: {first[0]} {first[1].name}", (report.rows.index(first), 0.5),
                     xycoords=("data", "axes fraction"), xytext=(4, 0), textcoords="offset points", color="red", fontsize=8)
    h = report.header
    top.set_title(f"{h['model']}: {h['dtype']} on {h['device']}, diffusers {h['diffusers']}, depth {h.get('depth', 'blocks')}"
                  f" — {report.summary()[:90]}", fontsize=9)
    axes[-1].set_xlabel(f"row, in execution order (exact zeros drawn at {ZERO:.0e})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=110))
    plt.close(fig)
    return path
