"""The README's mutation table: each edit of parity_tests/mutations.py under each `pare parity` mode.

    python scripts/mutation_table.py [--out benchmarks/results/mutations]   # CPU, ~10 min on 2 cores
    python scripts/mutation_table.py --gpu                                  # the GPU-only edits too

For every edit: does the mode fail, and is its first failing row the expected one (the edited
block at the default depth, the module itself at --depth all)? Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity_tests.mutations import MUTATIONS  # noqa: E402
from parity_tests.test_mutations import first_failure, run_parity  # noqa: E402

MODES = {  # column: extra flags (the edit's own flags come first)
    "default (fp64, blocks)": (),
    "--dtype fp32": ("--dtype", "fp32"),
    "--depth all": ("--depth", "all"),
}


def verdict(report: dict, expected) -> str:
    if report["returncode"] == 0:
        return "missed"
    got = first_failure(report)
    return f"caught at `{got[1]}`" if got == expected else f"caught, but named `{got[1]}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutations"))
    parser.add_argument("--gpu", action="store_true", help="also the edits that need CUDA")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if args.gpu or not m.gpu]
    # --depth all only where it names a module inside the block (elsewhere it names the same row).
    jobs = [(m, mode, (*m.flags, *flags)) for m in mutations for mode, flags in MODES.items()
            if not (m.gpu and mode != "default (fp64, blocks)") and not (mode == "--depth all" and not m.expected_all)]
    with TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        def one(job):
            m, mode, flags = job
            folder = Path(tmp) / f"{m.name}-{abs(hash(mode))}"
            folder.mkdir()
            report = run_parity(m, folder, *flags)
            expected = m.expected_all if mode == "--depth all" and m.expected_all else m.expected
            print(f"{m.name:28s} {mode:24s} {verdict(report, expected)}", flush=True)
            return report, expected
        results = list(pool.map(one, jobs))

    table = {}
    for (m, mode, _), (report, expected) in zip(jobs, results):
        table.setdefault(m.name, {})[mode] = {"verdict": verdict(report, expected), "first_failure": first_failure(report),
                                              "expected": expected, "summary": report["summary"]}
    rows = ["| edit | file | flags it needs | " + " | ".join(MODES) + " |", "|---" * (3 + len(MODES)) + "|"]
    for m in mutations:
        cells = [table[m.name].get(mode, {}).get("verdict", "same as default" if mode == "--depth all" else "—")
                 for mode in MODES]
        rows.append(f"| {m.what} | `{m.path}` | {' '.join(m.flags) or '—'} | " + " | ".join(cells) + " |")
    cpu = [m for m in mutations if not m.gpu]
    caught = sum(table[m.name]["default (fp64, blocks)"]["verdict"] != "missed" for m in cpu)
    named = sum(table[m.name]["default (fp64, blocks)"]["verdict"].startswith("caught at") for m in cpu)
    fp32 = sum(table[m.name]["--dtype fp32"]["verdict"] != "missed" for m in cpu)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    summary = (f"{len(cpu)} CPU edits ({date}): the default command catches {caught} and names the edited block for "
               f"{named}; `--dtype fp32` catches {fp32}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join([f"# Mutation suite: {summary}", "", *rows]) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": date, "summary": summary, "results": table}, indent=2))
    print(summary)


if __name__ == "__main__":
    main()
