"""The mutation suite: does `pare parity --reference-path COPY` catch small edits to diffusers, and name where?

Each edit of `parity_tests/mutations.py` is made to a copy of the installed diffusers. The
default command (on the CPU: float64, block-local rows, the tiny config) must fail, and its
first failing row must name the edited module: the innermost block at the default depth that
contains the edit. With `--depth all` it must name the module itself where the edit lives in one.

The runs are subprocesses (one diffusers per process), two at a time on one thread each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diffusers
import pytest

from parity_tests.harness import ROOT, subprocess_env
from parity_tests.mutations import MUTATIONS, Mutation, apply

SOURCE = Path(diffusers.__file__).parent
CPU = [m for m in MUTATIONS if not m.gpu]


def run_parity(mutation: Mutation, folder: Path, *flags: str) -> dict:
    """`pare parity --reference-path` on a copy of diffusers with `mutation` applied; the report as a dict."""
    tree = apply(mutation, SOURCE, folder / "tree")
    out = folder / "report"
    proc = subprocess.run([sys.executable, "-m", "pare.cli", "parity", "--reference-path", str(tree), "--out", str(out),
                           *flags], capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    if not out.with_suffix(".json").exists():
        raise AssertionError(f"{mutation.name}: no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(out.with_suffix(".json").read_text())
    report["returncode"] = proc.returncode
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Every CPU mutation's report under its own flags, and at --depth all where that names a different module."""
    jobs = [(m, m.flags) for m in CPU] + [(m, (*m.flags, "--depth", "all")) for m in CPU if m.expected_all]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda job: run_parity(job[0], tmp_path_factory.mktemp(job[0].name), *job[1]), jobs)
        return {(m.name, "--depth" in flags): report for (m, flags), report in zip(jobs, done)}


def first_failure(report: dict) -> tuple[str, str] | None:
    ff = report["first_failure"]
    return None if ff is None else (ff["component"], ff["name"])


@pytest.mark.parametrize("mutation", CPU, ids=lambda m: m.name)
def test_the_default_command_catches_the_edit_and_names_its_block(reports, mutation):
    report = reports[(mutation.name, False)]
    assert report["header"]["dtype"] == "fp64" and report["returncode"] == 1, report["summary"]
    assert first_failure(report) == mutation.expected, report["summary"]


@pytest.mark.parametrize("mutation", [m for m in CPU if m.expected_all], ids=lambda m: m.name)
def test_depth_all_names_the_module_the_edit_lives_in(reports, mutation):
    report = reports[(mutation.name, True)]
    assert report["returncode"] == 1 and first_failure(report) == mutation.expected_all, report["summary"]


def test_every_edit_applies_to_this_diffusers(tmp_path):
    # An edit whose text is not found would test nothing: each must change its file.
    for mutation in MUTATIONS:
        tree = apply(mutation, SOURCE, tmp_path / mutation.name)
        edited = (tree / "src" / "diffusers" / mutation.path).read_text()
        assert edited != (SOURCE / mutation.path).read_text() and mutation.new in edited, mutation.name


@pytest.mark.official
@pytest.mark.cuda
@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if m.gpu], ids=lambda m: m.name)
def test_gpu_only_edits_are_caught_by_their_flags(tmp_path, mutation):
    report = run_parity(mutation, tmp_path, *mutation.flags)
    assert report["returncode"] == 1 and first_failure(report) == mutation.expected, report["summary"]
