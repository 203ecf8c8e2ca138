"""A CPU smoke of `pare bench`: the benchmark runs end to end and writes well-formed results.

Benchmarks are not tests: no timing is asserted here, only that every case ran for both
libraries and that the files say what was measured.
"""

import json
import math

from pare.cli import main


def test_bench_smoke_writes_json_and_markdown(tmp_path):
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--iters", "2", "--warmup", "1",
                 "--batches", "1", "--out", str(tmp_path), "--stem", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {"device", "torch", "diffusers", "pare", "dtype", "date", "matmul_tflops"} <= set(data["header"])
    cases = {r["case"] for r in data["results"]}
    assert cases == {"tiny unet b1", "tiny vae decode 64px", "tiny vae encode 64px", "tiny ddim step",
                     "tiny txt2img 50 steps 32px"}
    for case in cases:
        rows = [r for r in data["results"] if r["case"] == case]
        assert {r["library"] for r in rows} == {"pare", "diffusers"}
        for r in rows:
            assert r["runs"] == 2 and math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    unet = next(r for r in data["results"] if r["case"] == "tiny unet b1" and r["library"] == "pare")
    assert unet["gflop"] > 0 and unet["floor_ms"] > 0
    table = (tmp_path / "smoke.md").read_text()
    assert all(f"| {case} | eager | 2 |" in table for case in cases)

    # The full pipeline: 50 UNet calls at batch 2 (CFG) dominate it, and its stages add up to the whole.
    for r in (r for r in data["results"] if r["case"] == "tiny txt2img 50 steps 32px"):
        stages = r["stages_ms"]
        assert set(stages) == {"text encoders", "unet", "vae decode", "other", "total"}, stages
        assert all(math.isfinite(v) for v in stages.values()) and min(stages["text encoders"], stages["unet"]) > 0
        assert stages["unet"] > 10 * stages["text encoders"] and stages["unet"] > 10 * stages["vae decode"]
        assert math.isclose(sum(v for k, v in stages.items() if k != "total"), stages["total"], rel_tol=1e-9)
        unet_b1_gflop = next(x["gflop"] for x in data["results"] if x["case"] == "tiny unet b1")
        assert r["gflop"] > 50 * 2 * unet_b1_gflop * 0.99
    assert "| tiny txt2img 50 steps 32px | pare |" in table and "| tiny txt2img 50 steps 32px | diffusers |" in table


def test_bench_rejects_unknown_names(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit, match=r"unknown mode \['turbo'\]"):
        main(["bench", "--device", "cpu", "--models", "tiny", "--modes", "turbo", "--out", str(tmp_path)])


def test_bench_times_a_controlnet_step_for_both_libraries(tmp_path):
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--cases", "controlnet-step", "--iters", "1",
                 "--warmup", "1", "--batches", "2", "--out", str(tmp_path), "--stem", "cn"]) == 0
    rows = json.loads((tmp_path / "cn.json").read_text())["results"]
    assert {(r["case"], r["library"]) for r in rows} == {("tiny controlnet + unet b2", "pare"),
                                                        ("tiny controlnet + unet b2", "diffusers")}
    assert all(math.isfinite(r["median_ms"]) and r["gflop"] > 0 for r in rows)


def test_bench_fast_mode_is_pare_only_and_compared_with_diffusers_best(tmp_path):
    """`--modes eager,fast`: the fast rows are pare's alone (no scheduler step: nothing for it to change), the
    table compares them with diffusers' fastest mode of the run, and the set-up time is reported."""
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--cases", "unet,scheduler-step", "--iters", "1",
                 "--warmup", "1", "--batches", "1", "--modes", "eager,fast", "--out", str(tmp_path),
                 "--stem", "fast"]) == 0
    rows = json.loads((tmp_path / "fast.json").read_text())["results"]
    assert {(r["case"], r["library"], r["mode"]) for r in rows} == {
        ("tiny unet b1", "pare", "eager"), ("tiny unet b1", "diffusers", "eager"), ("tiny unet b1", "pare", "fast"),
        ("tiny ddim step", "pare", "eager"), ("tiny ddim step", "diffusers", "eager")}
    fast = next(r for r in rows if r["mode"] == "fast")
    assert math.isfinite(fast["median_ms"]) and fast["compile_s"] is not None  # the set-up time is reported
    assert "| tiny unet b1 | fast (vs diffusers eager) | 1 |" in (tmp_path / "fast.md").read_text()


def test_bench_fast_mode_takes_a_controlnet_and_unet_pair(tmp_path):
    """The controlnet-step case times a (UNet, ControlNet) pair: the fast mode optimizes (and restores) both."""
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--cases", "controlnet-step", "--iters", "1",
                 "--warmup", "1", "--batches", "2", "--modes", "eager,fast", "--out", str(tmp_path), "--stem", "cnf"]) == 0
    rows = json.loads((tmp_path / "cnf.json").read_text())["results"]
    fast = [r for r in rows if r["mode"] == "fast"]
    assert [r["library"] for r in fast] == ["pare"] and math.isfinite(fast[0]["median_ms"]), fast


def test_bench_fast_mode_alone_and_pipeline_steps(tmp_path):
    """`--modes fast` alone still gets its table row (no diffusers figure to compare), and `--steps` sets the
    pipeline case's denoising steps (the SDXL target is for 30)."""
    assert main(["bench", "--device", "cpu", "--models", "tiny", "--cases", "pipeline", "--steps", "3", "--modes",
                 "fast", "--out", str(tmp_path), "--stem", "alone"]) == 0
    rows = json.loads((tmp_path / "alone.json").read_text())["results"]
    assert [(r["case"], r["library"], r["mode"]) for r in rows] == [("tiny txt2img 3 steps 32px", "pare", "fast")]
    assert "| tiny txt2img 3 steps 32px | fast | 2 | " in (tmp_path / "alone.md").read_text()


def test_image_timeline_charges_idle_to_the_host_mark_or_to_the_graph_it_falls_inside():
    """benchmarks/image_timeline.py's accounting on a made-up trace: idle time between two kernels of one CUDA graph
    launch is the graph's (its kernels' gaps), charged to the mark the graph was launched in, even while the host has
    moved on to another mark; idle between separate launches is charged to the host's innermost mark then."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "image_timeline.py"
    spec = importlib.util.spec_from_file_location("image_timeline", path)
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)

    def ev(cat, name, ts, dur, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {} if correlation is None else {"correlation": correlation}}

    trace = {"traceEvents": [
        ev("user_annotation", "image call", 0, 1000),
        ev("user_annotation", "head", 0, 100),
        ev("user_annotation", "loop", 100, 300),
        ev("user_annotation", "decode", 400, 600),
        ev("cuda_runtime", "cudaLaunchKernel", 50, 5, correlation=1),
        ev("kernel", "clip", 60, 40, correlation=1),  # idle before it: 60 us in "head"
        ev("cuda_runtime", "cudaGraphLaunch", 150, 10, correlation=2),
        ev("kernel", "step a", 200, 300, correlation=2),  # idle 100-200, the host in "loop"
        ev("kernel", "step b", 520, 300, correlation=2),  # 20 us between the graph's kernels, the host in "decode"
        ev("cuda_runtime", "cudaLaunchKernel", 830, 5, correlation=3),
        ev("kernel", "vae", 850, 100, correlation=3),  # idle 820-850 and 950-1000, in "decode"
    ]}
    got = timeline.analyse(trace)["idle_by_host_mark_ms"]
    assert got == {"loop": 0.1, "head": 0.06, "decode": 0.08, "inside the graph launched in loop": 0.02}, got
