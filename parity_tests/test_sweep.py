"""`pare sweep` and `pare.distributed`: the spec's cases, their assignment, a crashed case, a hung rank, and a
2-rank torchrun sweep (gloo, CPU) whose combined report equals the serial run's, case by case and row by row."""

import json
import subprocess
import sys

import pytest

from pare import distributed
from pare.cli import main
from pare.sweep import cases as sweep_cases
from pare.sweep.assign import assign, case_cost, checkpoint_key
from pare.sweep.heatmap import block_key, matrix
from pare.sweep.spec import expand, make_spec, read_spec_file

from .harness import ROOT, subprocess_env

ENV = subprocess_env()

# 2 configs x 2 dtypes x (unet + vae + 2 schedulers x (scheduler + pipeline)) = 24 cases, a few seconds on a CPU.
# bf16 rows carry each side's error against float64, which depend on every weight and input: two runs whose
# rows are equal computed the same thing (fp32 rows alone are all 0: pare is bit-identical to diffusers).
SPEC = """
configs = ["tiny", "tiny-sdxl"]
dtypes = ["fp32", "bf16"]
seeds = [0]
schedulers = ["DDIMScheduler", "EulerAncestralDiscreteScheduler"]
components = ["unet", "vae", "scheduler", "pipeline"]
steps = 2
device = "cpu"
"""


def torchrun(*argv, nproc=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *argv], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)


def without_timing(report: dict) -> list[dict]:
    """The cases with their rows, less each case's `run` (rank, device, seconds)."""
    return [{k: v for k, v in case.items() if k != "run"} for case in report["cases"]]


def test_cases_are_the_product_of_the_axes_in_spec_order(tmp_path):
    (tmp_path / "s.toml").write_text(SPEC)
    spec = make_spec(read_spec_file(tmp_path / "s.toml"))
    cases = expand(spec, "cpu")
    assert len(cases) == 2 * 2 * (2 + 2 * 2) and [c.index for c in cases] == list(range(24))
    assert [c.label for c in cases[:6]] == [
        "tiny fp32 seed 0 unet", "tiny fp32 seed 0 vae", "tiny fp32 seed 0 scheduler DDIMScheduler",
        "tiny fp32 seed 0 scheduler EulerAncestralDiscreteScheduler", "tiny fp32 seed 0 pipeline DDIMScheduler",
        "tiny fp32 seed 0 pipeline EulerAncestralDiscreteScheduler"]
    assert cases[6].label == "tiny bf16 seed 0 unet" and cases[12].config == "tiny-sdxl"
    # the scheduler axis does not multiply the unet and vae cases
    assert sum(c.component == "unet" for c in cases) == 4
    # defaults: pare parity's (tiny, fp32; fp64 on the CPU with a reference path), the folder's own scheduler
    default = expand(make_spec({}), "cpu")
    assert [c.label for c in default] == ["tiny fp32 seed 0 unet", "tiny fp32 seed 0 vae",
                                          "tiny fp32 seed 0 scheduler its own scheduler",
                                          "tiny fp32 seed 0 pipeline its own scheduler"]
    assert {c.dtype for c in expand(make_spec({"reference_path": str(tmp_path)}), "cpu")} == {"fp64"}
    assert len(expand(make_spec({"schedulers": "all", "components": "scheduler"}), "cpu")) >= 16


@pytest.mark.parametrize("raw, message", [
    ({"config": ["tiny"]}, "unknown keys ['config']"),
    ({"configs": ["tiny", "sd9"]}, "configs ['sd9'] not known"),
    ({"dtypes": "fp16,fp8"}, "dtypes ['fp8'] not known"),
    ({"schedulers": ["EulerDiscrete"]}, "schedulers ['EulerDiscrete'] not known"),
    ({"seeds": [0, "one"]}, "seeds must be integers"),
    ({"seeds": []}, "seeds is empty"),
    ({"dtypes": ["fp32", "fp32"]}, "dtypes lists a value twice"),
    ({"configs": ["tiny"], "model": "some/folder"}, "not both"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"components": ["controlnet"], "configs": ["sd21"]}, "not ['sd21']"),
    ({"fast": "yes"}, "fast must be true or false"),
])
def test_bad_specs_are_refused_naming_the_key(raw, message):
    with pytest.raises(ValueError, match="^my.toml: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        make_spec(raw, where="my.toml")


def test_bad_spec_files_are_usage_errors_naming_the_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("configs = [tiny\n")
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(bad)])
    assert exit_.value.code == 2 and f"{bad} is not valid TOML" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(tmp_path / "missing.toml")])
    assert exit_.value.code == 2 and "missing.toml does not exist" in capsys.readouterr().err
    yaml_spec = tmp_path / "s.yaml"
    yaml_spec.write_text("configs: [tiny-sdxl]\nseeds: [3, 4]\n")
    assert make_spec(read_spec_file(yaml_spec)).seeds == [3, 4]
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML is optional: without it, a clear error
    with pytest.raises(ValueError, match="reading a YAML spec needs PyYAML"):
        read_spec_file(yaml_spec)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_each_case_goes_to_exactly_one_rank(size):
    items = list(range(10))
    shares = [distributed.shard(items, distributed.World(rank=r, size=size)) for r in range(size)]
    assert sorted(i for share in shares for i in share) == items
    assert shares[0] == items[::size] and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_assignment_is_balanced_and_keeps_checkpoints_together(tmp_path):
    (tmp_path / "s.toml").write_text(SPEC)
    cases = expand(make_spec(read_spec_file(tmp_path / "s.toml")), "cpu")
    assert assign(cases, 1, steps=2) == [cases]  # serially: every case, in spec order
    for size in (2, 3, 4):
        shares = assign(cases, size, steps=2)
        assert shares == assign(list(reversed(cases)), size, steps=2)  # the same on every rank
        assert sorted(c.index for share in shares for c in share) == list(range(len(cases)))
        assert all(share == sorted(share, key=lambda c: c.index) for share in shares)
        builds = sum(len({checkpoint_key(c) for c in share}) for share in shares)
        round_robin = sum(len({checkpoint_key(c) for c in cases[r::size]}) for r in range(size))
        assert builds < round_robin if size > 2 else builds <= round_robin  # vs case i on rank i % N
        loads = [sum(case_cost(c, 2) for c in share) for share in shares]
        assert max(loads) <= sum(loads) / size + max(case_cost(c, 2) for c in cases) + 1e-9  # LPT's bound


def test_two_rank_torchrun_sweep_equals_the_serial_run(tmp_path, capsys, one_thread):
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "serial")]) == 0
    assert "PASS: all 24 cases" in capsys.readouterr().out
    proc = torchrun("-m", "pare.cli", "sweep", str(spec), "--out", str(tmp_path / "two"), "--timeout", "120")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rank 1/2] case 12/12" in proc.stdout and proc.stdout.count("wrote ") == 3  # rank 0 writes, once
    serial, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("serial", "two"))
    assert without_timing(two) == without_timing(serial)
    assert two["header"]["world_size"] == 2 and serial["header"]["world_size"] == 1
    shares = assign(expand(make_spec(read_spec_file(spec)), "cpu"), 2, steps=2)
    assert [c["run"]["rank"] for c in two["cases"]] == [0 if c in shares[0] else 1 for c in expand(
        make_spec(read_spec_file(spec)), "cpu")] and all(shares)
    bf16 = [r for c in two["cases"] if c["case"]["dtype"] == "bf16" for r in c["rows"]]
    assert sum(r["local"]["pare_err64"] not in (None, 0.0) for r in bf16) > 100  # the equality is not of zeros
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "two.md").read_text().startswith("# Parity sweep: 24 cases")
    assert not list(tmp_path.glob("two.rank*.json"))  # the ranks' parts, merged and removed


def test_a_crashed_case_is_a_failed_row_and_each_failure_is_listed(tmp_path, capsys, monkeypatch):
    original = sweep_cases.parity_args

    def crash_the_vae(spec, case, model, device):
        if case.component == "vae":
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(spec, case, model, device)

    monkeypatch.setattr(sweep_cases, "parity_args", crash_the_vae)
    # LMS's coefficients are exact integrals in pare, scipy's quad in diffusers: in fp64 its rows fail (README)
    code = main(["sweep", "--dtypes", "fp64", "--components", "vae,scheduler", "--schedulers",
                 "DDIMScheduler,LMSDiscreteScheduler", "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "r")])
    printed = capsys.readouterr().out
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    verdicts = {c["case"]["label"]: c["verdict"] for c in report["cases"]}
    assert verdicts == {"tiny fp64 seed 0 vae": "CRASHED", "tiny fp64 seed 0 scheduler DDIMScheduler": "PASS",
                        "tiny fp64 seed 0 scheduler LMSDiscreteScheduler": "FAIL"}
    crashed, _, lms = report["cases"]
    assert crashed["error"] == "RuntimeError: CUDA out of memory (simulated)" and crashed["rows"] == []
    assert lms["first_failure"]["name"].startswith("LMSDiscreteScheduler.step ")
    assert "FAIL: 2 of 3 cases failed (1 crashed)" in printed
    md = (tmp_path / "r.md").read_text()
    assert "## First failure of each failing case" in md and "### 0: tiny fp64 seed 0 vae" in md
    assert "### 2: tiny fp64 seed 0 scheduler LMSDiscreteScheduler" in md and "[FAIL] LMSDiscreteScheduler.step " in md


def test_fast_sweeps_run_pares_fast_path(tmp_path, monkeypatch):
    """`--fast` (or `fast = true`) reaches every case's pare parity run: pare's UNet there is the fast one."""
    import pare.parity.run as parity_run

    seen = []
    original = parity_run.fast_if

    def spy(fast, model):
        seen.append(fast)
        return original(fast, model)

    monkeypatch.setattr(parity_run, "fast_if", spy)
    assert main(["sweep", "--components", "unet", "--device", "cpu", "--fast", "--out", str(tmp_path / "r")]) == 0
    assert seen == [True]
    assert json.loads((tmp_path / "r.json").read_text())["header"]["spec"]["fast"] is True


def test_heat_map_columns_line_up_across_schedulers(tmp_path):
    assert block_key("pipeline", "latents after step 3 (t=741)") == "pipeline: latents after step 3"
    assert block_key("scheduler", "EulerDiscreteScheduler.step 2 (t=500)") == "scheduler: step 2"
    assert block_key("pipeline", "StableDiffusionXLPipeline + DDIMScheduler, 2 steps: image") == "pipeline: image"
    spec = make_spec({"components": "scheduler,unet", "schedulers": "DDIMScheduler,EulerDiscreteScheduler",
                      "steps": 2})
    from pare.parity.reference import import_reference
    from pare.sweep.report import SweepReport

    results = [sweep_cases.run_case(c, spec, import_reference(), __import__("torch").device("cpu"),
                                    sweep_cases.Checkpoints()) for c in expand(spec, "cpu")]
    columns, values = matrix(SweepReport({}, results))
    assert columns[:4] == ["scheduler: timesteps (2 steps)", "scheduler: step 1", "scheduler: step 2",
                           "scheduler: scale_model_input 1"]  # Euler's extra rows after the shared ones
    assert all(v == v for v in values[0][:3]) and values[0][3] != values[0][3]  # DDIM has no scale_model_input
    assert all(v != v for v in values[0][5:]) and all(v == v for v in values[2][5:])  # unet blocks: the unet case


HANG = """
import os, sys, time
import pare.sweep.run
from pare.cli import main

original = pare.sweep.run.run_case


def hang_rank_1(*args, **kwargs):  # rank 1 hangs in its first case
    if os.environ["RANK"] == "1":
        time.sleep(120)
    return original(*args, **kwargs)


pare.sweep.run.run_case = hang_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_a_hung_rank_is_named_and_the_finished_ranks_cases_are_kept(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    proc = torchrun(str(script), "sweep", "--components", "unet,vae", "--device", "cpu", "--timeout", "3",
                    "--out", str(tmp_path / "r"), timeout=120)
    assert proc.returncode != 0
    assert ("pare sweep: error: rank 0/2: rank(s) 1 did not reach the end of the sweep within --timeout 3 s"
            in proc.stderr), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"the cases of the ranks that finished are in {tmp_path / 'r.rank*.json'}" in proc.stderr
    part = json.loads((tmp_path / "r.rank0.json").read_text())
    assert [c["verdict"] for c in part["cases"]] == ["PASS"] and not (tmp_path / "r.rank1.json").exists()
