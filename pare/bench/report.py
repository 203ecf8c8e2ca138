"""Writing a benchmark run: JSON (everything), Markdown (the table to read) and a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import write_atomically, write_text_atomically
from .timing import PARE_ONLY_MODES, Run


def _ms(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}"


def to_markdown(run: Run) -> str:
    h = run.header
    lines = [
        f"# pare vs diffusers: latency and memory ({h['date']})",
        "",
        f"device: {h['device']} (driver {h['driver']}), torch {h['torch']}, diffusers {h['diffusers']}, "
        f"pare {h['pare']}, dtype {h['dtype']}, matmul peak measured in this run: {h['matmul_tflops']:.1f} TFLOP/s. "
        f"Median of the timed runs (column runs; {h['iters']} after {h['warmup']} warm-up runs unless said) timed with "
        f"{'CUDA events' if h['device'] != 'cpu' else 'the host clock'}; spread is the 10th-90th percentile. "
        "Ratios within this table are the figures to quote. Peak memory is the most allocated at once, and in "
        "brackets the most the allocator held (CUDA graph pools stay held after their capture).",
        "",
        "| case | mode | runs | pare ms | diffusers ms | pare / diffusers | pare peak GiB (reserved) "
        "| diffusers peak GiB (reserved) | GFLOP "
        "| floor ms | pare x floor | compile s (pare / diffusers) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.case, r.mode, r.library): r for r in run.results}
    for case, mode in dict.fromkeys((r.case, r.mode) for r in run.results):
        ours, theirs = by_key.get((case, mode, "pare")), by_key.get((case, mode, "diffusers"))
        label = mode
        if theirs is None and mode in PARE_ONLY_MODES:  # against the fastest diffusers mode of the same run
            timed = [r for r in run.results if r.case == case and r.library == "diffusers" and not math.isnan(r.median_ms)]
            theirs = min(timed, key=lambda r: r.median_ms, default=None)
            label = f"{mode} (vs diffusers {theirs.mode})" if theirs else mode
        if ours is None:
            continue
        ratio = (ours.median_ms / theirs.median_ms if theirs is not None and theirs.median_ms
                 and not math.isnan(theirs.median_ms) else None)
        mem = lambda r: "—" if r is None or r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}" + (  # noqa: E731
            "" if r.peak_reserved_gib is None else f" ({r.peak_reserved_gib:.2f})")
        theirs_compile = float("nan") if theirs is None or theirs.compile_s is None else theirs.compile_s
        comp = "—" if ours.compile_s is None else f"{ours.compile_s:.0f} / {theirs_compile:.0f}"
        timed = lambda r: "—" if r is None else f"{_ms(r.median_ms)} ({_ms(r.p10_ms)}–{_ms(r.p90_ms)})"  # noqa: E731
        lines.append(
            f"| {case} | {label} | {ours.runs} | {timed(ours)} | {timed(theirs)} "
            f"| {'—' if ratio is None or math.isnan(ratio) else f'{ratio:.2f}'} | {mem(ours)} | {mem(theirs)} "
            f"| {'—' if ours.gflop is None else f'{ours.gflop:.4g}'} | {_ms(ours.floor_ms)} "
            f"| {'—' if ours.x_floor is None or math.isnan(ours.x_floor) else f'{ours.x_floor:.1f}'} | {comp} |"
        )
    lines += stage_table(run)
    failed = [r for r in run.results if r.note.startswith("failed")]
    if failed:
        lines += ["", "Failed cases:", ""] + [f"- {r.case} / {r.library} / {r.mode}: {r.note}" for r in failed]
    return "\n".join(lines) + "\n"


def stage_table(run: Run) -> list[str]:
    """Full pipelines: each stage's time and share of the run, for both libraries (one instrumented eager run)."""
    staged = [r for r in run.results if r.stages_ms]
    if not staged:
        return []
    names = [k for k in staged[0].stages_ms if k != "total"]
    lines = ["", "Full text-to-image, time per stage (one more eager run, each stage bracketed by CUDA events or the host clock; "
             "\"other\" is what no stage covers: scheduler steps, CFG arithmetic, casts, launch gaps; the hooks on the "
             "UNet make pare's fast path step its loop here, not replay it from one graph as in the timed runs):", "",
             "| case | library | total ms | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in staged:
        total = r.stages_ms["total"]
        cells = [f"{r.stages_ms[n]:.1f} ({r.stages_ms[n] / total:.1%})" for n in names]
        library = r.library if r.mode == "eager" else f"{r.library} ({r.mode})"
        lines.append(f"| {r.case} | {library} | {total:.1f} | " + " | ".join(cells) + " |")
    return lines


def chart(run: Run, path: Path) -> Path | None:
    """Grouped bars, pare beside diffusers, one group per (case, mode). Needs matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys((r.case, r.mode) for r in run.results))
    by_key = {(r.case, r.mode, r.library): r.median_ms for r in run.results}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(groups) + 2), 4.5))
    width = 0.4
    for i, lib in enumerate(("pare", "diffusers")):
        values = [by_key.get((c, m, lib), float("nan")) for c, m in groups]
        ax.bar([x + (i - 0.5) * width for x in range(len(groups))], values, width, label=lib)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("median latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"pare vs diffusers {run.header['diffusers']}, {run.header['device']}, {run.header['dtype']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=120))
    plt.close(fig)
    return path


def write(run: Run, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    write_text_atomically(paths[0], json.dumps(run.as_dict(), indent=2, default=str))
    write_text_atomically(paths[1], to_markdown(run))
    png = chart(run, folder / f"{stem}.png")
    return paths + ([png] if png else [])
