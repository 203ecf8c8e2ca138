"""The sweep's heat map: cases (rows, spec order) x blocks (columns), each cell the block's worst error over its
limit, as a PNG.

A cell's value is `severity` (pare/parity/report.py) of the block's local and accumulated views, the
larger: below float32 the err64 budget ratio err64(pare) / (1.25 x err64(diffusers) + floor), at
fp32 and fp64 rel L2 over its limit. 1 or more fails and is drawn red; below 1 a log scale from
1e-6 (bit-identical blocks, 0, are drawn at the bottom). A white x marks each case's first failure;
a crashed case is a black band with its error; a block a case does not have is grey.

Columns are blocks by name, in order of first appearance. So that the cases line up, step rows
drop what changes with the scheduler: the timestep (`latents after step 3 (t=741)` -> `latents
after step 3`), the class (`DDIMScheduler.step 3` -> `step 3`) and the pipeline label of the first row.
matplotlib is imported here only, as in plot.py.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from ..atomic import write_atomically
from ..parity.report import severity

FLOOR = 1e-6  # the bottom of the colour scale: bit-identical blocks (0) are drawn here


def block_key(component: str, name: str) -> str:
    """The column of a row: `component: name`, without the parts that differ between schedulers."""
    name = re.sub(r" \(t=[^)]*\)", "", name)
    name = re.sub(r"^\w+Scheduler\.", "", name)
    name = re.sub(r"^\w+Pipeline \+ \w+, \d+ steps: ", "", name)
    return f"{component}: {name}"


def matrix(report) -> tuple[list[str], list[list[float]]]:
    """(columns, values): one list per case, NaN where the case has no such block."""
    columns: dict[str, int] = {}
    for result in report.results:
        for component, row in result.rows:
            columns.setdefault(block_key(component, row.name), len(columns))
    # group the columns by component (in order of first appearance), blocks in execution order within each
    components = list(dict.fromkeys(key.split(":", 1)[0] for key in columns))
    ordered = sorted(columns, key=lambda key: (components.index(key.split(":", 1)[0]), columns[key]))
    columns = {key: i for i, key in enumerate(ordered)}
    values = []
    for result in report.results:
        line = [math.nan] * len(columns)
        for component, row in result.rows:
            i = columns[block_key(component, row.name)]
            value = max(severity(row.local), severity(row.accumulated))
            line[i] = value if math.isnan(line[i]) else max(line[i], value)
        values.append(line)
    return list(columns), values


def heatmap(report, path: str | Path) -> Path | None:
    """Write the heat map of `report` to `path`; returns the path, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm
    except ImportError:
        print(f"pare sweep: {path} not written: the heat map needs matplotlib (pip install matplotlib)",
              file=sys.stderr)
        return None

    columns, values = matrix(report)
    if not columns:  # every case crashed: one empty column to draw the bands on
        columns, values = ["(no rows)"], [[math.nan] for _ in values]
    data = np.array(values, dtype=float).reshape(len(values), len(columns))
    shown = np.where(np.isnan(data), np.nan, np.clip(data, FLOOR, None))
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(min(40, max(9, 5 + 0.12 * n_cols)), min(60, 4 + 0.25 * n_rows)))  # 4 in: the block names
    cmap = matplotlib.colormaps["viridis"].with_extremes(over="red", bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap=cmap,
                      norm=LogNorm(vmin=FLOOR, vmax=1.0))
    fig.colorbar(image, ax=ax, extend="max", label="worst error / limit (red: ≥ 1, fails)", shrink=0.9)
    for i, result in enumerate(report.results):
        if result.error is not None:
            ax.axhspan(i - 0.5, i + 0.5, color="black")
            ax.text(0, i, f" crashed: {result.error}"[:160], color="white", va="center", fontsize=7)
        elif result.first_failure is not None:
            component, row = result.first_failure
            ax.plot(columns.index(block_key(component, row.name)), i, "x", color="white", ms=6, mew=1.5)
    components = [c.split(":", 1)[0] for c in columns]
    for j in range(1, n_cols):
        if components[j] != components[j - 1]:
            ax.axvline(j - 0.5, color="white", lw=0.8)
    ax.set_yticks(range(n_rows), [f"{r.case.index}: {r.case.label}" for r in report.results], fontsize=7)
    step = max(1, math.ceil(n_cols / 80))  # label at most about 80 columns
    ax.set_xticks(range(0, n_cols, step), columns[::step], rotation=90, fontsize=6)
    h = report.header
    ax.set_title(f"pare sweep: {n_rows} cases x {n_cols} blocks, {h['world_size']} rank(s), "
                 f"diffusers {h['diffusers']} — {report.summary()[:100]}", fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=100))
    plt.close(fig)
    return Path(path)
