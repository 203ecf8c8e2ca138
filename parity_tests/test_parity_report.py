"""`pare parity`: the report's numbers, its verdicts on broken blocks, and --reference-path."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch

import pare
from pare.cli import main
from pare.parity import compare
from pare.parity import run as parity


def report_for(tmp_path, *argv):
    parser = parity.argparse.ArgumentParser()
    parity.add_arguments(parser)
    return parity.run(parser.parse_args([*argv, "--out", str(tmp_path / "report")]))


def test_default_tiny_report_passes_and_is_written(tmp_path, capsys):
    assert main(["parity", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "PASS: all" in printed and "rows nearest their limit" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["header"]["diffusers"] == diffusers.__version__ and data["header"]["pare"] == pare.__version__
    assert data["header"]["dtype"] == "fp32" and data["first_failure"] is None
    assert {row["component"] for row in data["rows"]} == {"unet", "vae", "scheduler", "pipeline"}
    names = [r["name"] for r in data["rows"]]
    assert "UNet2DConditionModel" in names and "VAEDecode" in names
    steps = [r for r in data["rows"] if r["component"] == "pipeline" and r["name"].startswith("latents after step")]
    assert len(steps) == 50 and data["rows"][-1]["name"] == "image"
    assert [r["name"] for r in data["rows"] if r["component"] == "scheduler"][1:] == [
        f"DDIMScheduler.step {i} (t={t})" for i, t in enumerate(range(981, 0, -20), 1)]
    # every row has both views; in fp32 on the CPU pare is bit-identical to diffusers in both
    for r in data["rows"][1:]:
        assert r["local"]["rel_l2"] == 0.0, r["name"]
        assert r["accumulated"] is None or r["accumulated"]["rel_l2"] == 0.0, r["name"]
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# Parity report: tiny config, random init (generated)") and "| unet | down_blocks.0 |" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verbose_prints_every_row_and_the_table_fits_the_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    report = report_for(tmp_path, "--components", "unet", "--verbose")
    printed = capsys.readouterr().out
    table = printed.split("every row, in execution order:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(table) == 2 + len(report.rows) and max(len(line) for line in table) <= 80
    assert any("…" in line for line in table)  # long block names lose their middle, keep their ends
    assert any(line.split()[1].endswith("blocks.0") for line in table[2:] if "…" in line)


def test_shorten_keeps_both_ends():
    from pare.parity.report import shorten

    name = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert shorten(name, 100) == name
    short = shorten(name, 21)
    assert len(short) == 21 and short.startswith("down_b") and short.endswith("_blocks.0") and "…" in short


def test_report_numbers_are_the_comparison_helpers(tmp_path, monkeypatch):
    # Capture the final UNet outputs the report compared, and recompute the row with `compare`.
    seen = {}
    original = parity.compare_blocks

    def spy(model, reference, args, kwargs=None, **kw):
        result = original(model, reference, args, kwargs, **kw)
        if type(model).__name__ == "UNet2DConditionModel":
            seen["ours"] = model(*args, **(kwargs or {}))
            seen["theirs"] = reference(*args, **(kwargs or {})).sample
        return result

    monkeypatch.setattr(parity, "compare_blocks", spy)
    report = report_for(tmp_path, "--components", "unet")
    row = next(r for c, r in report.rows if r.name == "UNet2DConditionModel")
    again = compare("UNet2DConditionModel", seen["ours"], seen["theirs"], scope="end_to_end")
    for view in (row.local, row.accumulated):  # the whole model: same inputs on both sides in either view
        assert (view.max_abs, view.rel_l2, view.cos_dist, view.passed) == (again.max_abs, again.rel_l2, again.cos_dist,
                                                                           again.passed)


def break_pare_unet(monkeypatch, breaker):
    """Make pare's loaded UNet wrong in one place, chosen by `breaker(unet)`."""
    original = pare.UNet2DConditionModel.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        unet = original(cls, *args, **kwargs)
        breaker(unet)
        return unet

    monkeypatch.setattr(pare.UNet2DConditionModel, "from_pretrained", classmethod(load))


@pytest.mark.parametrize("dtype,error", [("fp32", 1e-3), ("fp16", 1e-2)])
def test_a_scale_error_fails_and_names_that_block(tmp_path, monkeypatch, dtype, error):
    """fp32 catches a 1e-3 scale error. fp16 cannot: by then both libraries are ~1e-3 from float64
    (fp16 keeps 11 bits), so a 1e-3 slip is inside the budget; a 1e-2 one is not."""

    def scale_output(unet):
        unet.up_blocks[1].resnets[0].register_forward_hook(lambda m, i, out: out * (1 + error))

    break_pare_unet(monkeypatch, scale_output)
    report = report_for(tmp_path, "--components", "unet", "--dtype", dtype)
    component, first = report.first_failure
    assert (component, first.name) == ("unet", "up_blocks.1.resnets.0")
    assert all(r.passed for _, r in report.rows[: report.rows.index((component, first))])
    assert "FAIL: " in report.summary() and "up_blocks.1.resnets.0" in report.summary()


def test_a_wrong_attention_scale_fails_and_names_that_transformer_block(tmp_path, monkeypatch):
    def sharpen_attention(unet):
        # Scaling the query by 1.1 is scaling Q K^T / sqrt(d) by 1.1: a wrong attention scale.
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        with torch.no_grad():
            attn.to_q.weight.mul_(1.1)

    break_pare_unet(monkeypatch, sharpen_attention)
    _, first = report_for(tmp_path, "--components", "unet").first_failure
    assert first.name == "down_blocks.0.attentions.0.transformer_blocks.0"


def test_a_slip_in_one_denoising_step_fails_the_pipeline_at_that_step(tmp_path, monkeypatch):
    from pare.schedulers import DDIMScheduler

    original = DDIMScheduler.step

    def step(self, model_output, timestep, *args, **kwargs):  # the third step's output (t=401) off by 1e-3
        out = original(self, model_output, timestep, *args, **kwargs)
        return out._replace(prev_sample=out.prev_sample * 1.001) if int(timestep) == 401 else out

    monkeypatch.setattr(DDIMScheduler, "step", step)
    report = report_for(tmp_path, "--components", "pipeline", "--steps", "5")
    names = [r.name for _, r in report.rows]
    assert names[0].startswith("StableDiffusionPipeline + DDIMScheduler, 5 steps: text conditioning")
    assert names[1:] == [f"latents after step {i} (t={t})" for i, t in enumerate((801, 601, 401, 201, 1), 1)] + ["image"]
    component, first = report.first_failure
    assert (component, first.name) == ("pipeline", "latents after step 3 (t=401)")
    assert all(r.passed for _, r in report.rows[:3])
    # step-local: the later steps start from diffusers' latents, so only step 3 is wrong on its own
    assert [r.name for _, r in report.rows if not r.local.passed] == ["latents after step 3 (t=401)"]
    assert not report.rows[4][1].accumulated.passed  # ... while the drift carries on into step 4


def test_a_slip_at_one_scheduler_step_is_named_at_that_step(tmp_path, monkeypatch):
    from pare.schedulers import DDIMScheduler

    original = DDIMScheduler.step

    def step(self, model_output, timestep, *args, **kwargs):
        out = original(self, model_output, timestep, *args, **kwargs)
        return out._replace(prev_sample=out.prev_sample * (1 + 1e-4)) if int(timestep) == 21 else out

    monkeypatch.setattr(DDIMScheduler, "step", step)
    report = report_for(tmp_path, "--components", "scheduler")
    assert report.first_failure[1].name == "DDIMScheduler.step 49 (t=21)"
    assert [r.name for _, r in report.rows if not r.local.passed] == ["DDIMScheduler.step 49 (t=21)"]


def test_fp64_is_exact_and_catches_what_fp32_cannot(tmp_path, monkeypatch):
    # An edit at float32's rounding level: one transformer block's output off by 3e-7.
    def nudge(unet):
        unet.down_blocks[0].attentions[0].transformer_blocks[0].register_forward_hook(lambda m, i, out: out * (1 + 3e-7))

    break_pare_unet(monkeypatch, nudge)
    assert report_for(tmp_path, "--components", "unet", "--dtype", "fp32").passed
    report = report_for(tmp_path, "--components", "unet", "--dtype", "fp64")
    assert report.header["dtype"] == "fp64"
    assert report.first_failure[1].name == "down_blocks.0.attentions.0.transformer_blocks.0"


def test_reference_path_imports_diffusers_from_that_tree(tmp_path):
    # A copy of the installed diffusers with one edited line: ResnetBlock2D's output scaled by 1.001.
    tree = tmp_path / "checkout" / "src"
    shutil.copytree(Path(diffusers.__file__).parent, tree / "diffusers", ignore=shutil.ignore_patterns("__pycache__"))
    resnet = tree / "diffusers" / "models" / "resnet.py"
    line = "        output_tensor = (input_tensor + hidden_states) / self.output_scale_factor\n"
    source = resnet.read_text()
    assert source.count(line) >= 1
    resnet.write_text(source.replace(line, line.replace("/ self.output_scale_factor", "/ self.output_scale_factor * 1.001")))

    out = tmp_path / "edited"
    proc = subprocess.run([sys.executable, "-m", "pare.cli", "parity", "--components", "unet", "--reference-path",
                           str(tree.parent), "--out", str(out)], capture_output=True, text=True, timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert Path(data["header"]["diffusers_path"]) == (tree / "diffusers").resolve()
    assert data["header"]["dtype"] == "fp64"  # the default for --reference-path on the CPU
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert data["first_failure"] == {"component": "unet", "name": "down_blocks.0.resnets.0"}


def test_controlnet_component_compares_every_block_of_the_published_config(tmp_path):
    report = report_for(tmp_path, "--components", "controlnet")
    names = [r.name for _, r in report.rows]
    assert report.passed and names[-1] == "ControlNetModel" and "controlnet_cond_embedding" in names
    assert {c for c, _ in report.rows} == {"controlnet"}
    with pytest.raises(SystemExit, match="no published ControlNet config for --config sd21"):
        report_for(tmp_path, "--components", "controlnet", "--config", "sd21")


def test_schedulers_takes_web_ui_sampler_names_and_refuses_unknown_ones(tmp_path, capsys):
    """--schedulers "DPM++ 2M SDE Karras": its class with the options the name sets, on both sides (the label keeps
    the name); a name that is neither a class nor a sampler is refused, naming both lists."""
    report = report_for(tmp_path, "--components", "scheduler", "--schedulers", "DPM++ 2M SDE Karras,UniPC",
                        "--steps", "4")
    names = [row.name for _, row in report.rows]
    assert names[0] == "DPM++ 2M SDE Karras.timesteps (4 steps)" and "UniPC.timesteps (4 steps)" in names
    assert report.passed
    from pare.schedulers.samplers import resolve

    assert resolve("DPM++ 2M SDE Karras").options["algorithm_type"] == "sde-dpmsolver++"
    assert resolve("EulerDiscreteScheduler").options == {}
    with pytest.raises(SystemExit, match="neither a pare scheduler class .* nor a sampler name"):
        report_for(tmp_path, "--components", "scheduler", "--schedulers", "Euler b")


def test_schedulers_takes_a_class_with_options_as_describe_writes_it(tmp_path):
    """--schedulers "DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False),UniPC": the options reach
    both sides through `resolve` (the rows exist and pass), the commas inside brackets do not split the list, and
    `resolve(describe(s))` gives s back for every web-UI name. Options the class does not take, positional values
    and non-literals are refused by name."""
    from pare.schedulers.samplers import SAMPLERS, describe, resolve, split_names

    third = "DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False)"
    assert split_names(f"{third},UniPC, Euler a") == [third, "UniPC", "Euler a"]
    report = report_for(tmp_path, "--components", "scheduler", "--schedulers", f"{third},UniPC", "--steps", "5")
    names = [row.name for _, row in report.rows]
    assert f"{third}.timesteps (5 steps)" in names and "UniPC.timesteps (5 steps)" in names
    assert report.passed
    assert resolve(third).options == {"solver_order": 3, "lower_order_final": False}
    for sampler in SAMPLERS.values():
        assert resolve(describe(sampler)) == sampler
    for bad, why in (("DPMSolverMultistepScheduler(order=3)", "takes no option order"),
                     ("DPMSolverMultistepScheduler(3)", "keywords"),
                     ("DPMSolverMultistepScheduler(solver_order=three)", "Python literals")):
        with pytest.raises(ValueError, match=why):
            resolve(bad)
        with pytest.raises(SystemExit, match=why):
            report_for(tmp_path, "--components", "scheduler", "--schedulers", bad)
