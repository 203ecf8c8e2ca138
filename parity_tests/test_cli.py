"""`pare generate`, run in-process through `pare.cli.main` on the tiny pipeline folders."""

import json
import shutil

import PIL.Image
import pytest

from pare.cli import main

from .tiny_components import pipeline_folder


PROMPT = "a photo of the cat"


def generate(*args: str) -> int:
    """`pare generate` on the CPU in float32 (its default device is CUDA where there is one), where the images it is
    compared with are drawn by diffusers."""
    return main(["generate", "--prompt", PROMPT, "--steps", "2", "--seed", "0", "--device", "cpu", *args])


def test_generate_writes_a_png_of_the_asked_size_with_a_progress_bar(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert generate("--model", str(pipeline_folder("tiny-sd")), "--height", "16", "--width", "24", "--out", str(out)) == 0
    assert PIL.Image.open(out).size == (24, 16)
    captured = capsys.readouterr()
    assert "2/2" in captured.err  # tqdm's bar over the denoising steps
    assert "StableDiffusionPipeline" in captured.out and "seed 0" in captured.out


def test_generate_is_reproducible_from_the_seed(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        generate("--model", str(pipeline_folder("tiny-sd")), "--height", "16", "--width", "16", "--out", str(out))
    assert PIL.Image.open(a).tobytes() == PIL.Image.open(b).tobytes()


def test_generate_fast_makes_the_reference_image_to_rounding(tmp_path, monkeypatch):
    """--fast runs pipe.enable_fast() (pare/fast/); on the CPU its blocks are PyTorch twins of the reference."""
    import numpy as np

    import pare.fast

    calls = []
    original = pare.fast.optimize
    monkeypatch.setattr(pare.fast, "optimize", lambda pipe, **kw: calls.append(pipe) or original(pipe, **kw))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    generate("--model", str(pipeline_folder("tiny-sd")), "--height", "16", "--width", "16", "--out", str(a))
    generate("--model", str(pipeline_folder("tiny-sd")), "--height", "16", "--width", "16", "--out", str(b), "--fast")
    assert len(calls) == 1
    diff = np.abs(np.asarray(PIL.Image.open(a), dtype=int) - np.asarray(PIL.Image.open(b), dtype=int))
    assert diff.max() <= 1  # uint8 images: at most one level of rounding apart


def test_generate_sdxl_with_another_scheduler_and_img2img(tmp_path, capsys):
    folder = str(pipeline_folder("tiny-sdxl"))
    first, second = tmp_path / "xl.png", tmp_path / "xl2.png"
    assert generate("--model", folder, "--scheduler", "DDPMScheduler", "--height", "16", "--width", "16",
                    "--negative-prompt", "dark", "--guidance", "3", "--out", str(first)) == 0
    assert "StableDiffusionXLPipeline, DDPMScheduler" in capsys.readouterr().out
    assert generate("--model", folder, "--image", str(first), "--strength", "0.5", "--out", str(second)) == 0
    assert "StableDiffusionXLImg2ImgPipeline" in capsys.readouterr().out
    assert PIL.Image.open(second).size == (16, 16)


def test_unknown_scheduler_name_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        generate("--model", str(pipeline_folder("tiny-sd")), "--scheduler", "EulerDiscrete", "--out", str(out))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'EulerDiscrete' is not a pare scheduler" in err and "DDIMScheduler" in err
    assert not out.exists()


def test_size_not_a_multiple_of_8_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate("--model", str(pipeline_folder("tiny-sd")), "--height", "20", "--out", str(tmp_path / "x.png"))
    assert info.value.code == 2
    assert "--height must be a positive multiple of 8" in capsys.readouterr().err


def test_incomplete_model_folder_is_a_clear_error(tmp_path, capsys):
    broken = shutil.copytree(pipeline_folder("tiny-sd"), tmp_path / "pipe")
    shutil.rmtree(broken / "unet")
    out = tmp_path / "x.png"
    assert generate("--model", str(broken), "--out", str(out)) == 1
    assert "unet: model_index.json lists UNet2DConditionModel, but the folder" in capsys.readouterr().err
    assert not out.exists()


def test_folder_naming_an_unimplemented_scheduler_works_with_scheduler_or_sampler_flag(tmp_path, capsys):
    """A folder naming a scheduler pare has not (DPMSolverSDEScheduler): an error without a flag, an image with one."""
    sde = shutil.copytree(pipeline_folder("tiny-sd"), tmp_path / "pipe")
    index = json.loads((sde / "model_index.json").read_text())
    (sde / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DPMSolverSDEScheduler"]}))
    out = tmp_path / "x.png"
    assert generate("--model", str(sde), "--height", "16", "--width", "16", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "names DPMSolverSDEScheduler, which pare does not implement; pass --sampler or --scheduler" in err
    assert generate("--model", str(sde), "--scheduler", "DDIMScheduler", "--height", "16", "--width", "16",
                    "--out", str(out)) == 0
    assert out.exists()
    assert generate("--model", str(sde), "--sampler", "DDIM", "--height", "16", "--width", "16",
                    "--out", str(out)) == 0
    assert "DDIMScheduler (sampler 'DDIM')" in capsys.readouterr().out


# --- schedulers and samplers ------------------------------------------------------------------


def diffusers_image(folder, scheduler_class: str, options: dict, steps: int = 3, **kwargs):
    """diffusers' pipeline from `folder`, its scheduler switched to `scheduler_class` with `options` (None: the
    folder's own), run as `pare generate` runs: seed 0 on a CPU generator, the CLI's prompt, 16 x 16."""
    import diffusers
    import numpy as np
    import torch

    index = json.loads((folder / "model_index.json").read_text())
    cls = diffusers.StableDiffusionXLPipeline if "XL" in index["_class_name"] else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    if options is not None:
        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config, **options)
    assert type(pipe.scheduler).__name__ == scheduler_class
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                  height=16, width=16, output_type="np", **kwargs).images
    return np.asarray(images)


def png(path):
    import numpy as np

    return np.asarray(PIL.Image.open(path), dtype=np.float32)[None] / 255.0  # (1, H, W, 3) in [0, 1]


def test_sd15_folder_runs_its_pndm_scheduler_without_a_flag(tmp_path, capsys):
    """The SD1.5 folder names PNDMScheduler: `pare generate` runs it as is, and draws diffusers' image."""
    from .scheduler_folders import folder_with_scheduler
    from .tiny_components import assert_same_images

    folder = folder_with_scheduler("tiny-sd", "sd15", tmp_path / "sd15")
    out = tmp_path / "x.png"
    assert generate("--model", str(folder), "--steps", "3", "--height", "16", "--width", "16", "--out", str(out)) == 0
    assert "StableDiffusionPipeline, PNDMScheduler, 3 steps" in capsys.readouterr().out
    assert_same_images(png(out), diffusers_image(folder, "PNDMScheduler", None), "SD1.5 folder, PNDM")


# The samplers the issue names, plus one second-order (Heun) and one SDE sampler on SDXL.
CLI_SAMPLERS = [("tiny-sd", "Euler a"), ("tiny-sd", "DPM++ 2M Karras"), ("tiny-sd", "DPM++ SDE Karras"),
                ("tiny-sd", "UniPC"), ("tiny-sd", "LCM"), ("tiny-sdxl", "Heun"), ("tiny-sdxl", "DPM++ 2M SDE")]


@pytest.mark.parametrize(("family", "name"), CLI_SAMPLERS)
def test_sampler_flag_draws_diffusers_image_for_that_scheduler(tmp_path, capsys, family, name):
    """`--sampler NAME` = the table's class with its options on the folder's config, as diffusers users switch."""
    from pare.schedulers import SCHEDULERS
    from pare.schedulers.samplers import SAMPLERS

    from .tiny_components import assert_same_images

    sampler = SAMPLERS[name]
    if sampler.class_name not in SCHEDULERS:
        pytest.skip(f"{sampler.class_name} has not landed yet")
    out = tmp_path / "x.png"
    assert generate("--model", str(pipeline_folder(family)), "--sampler", name, "--steps", "3", "--height", "16",
                    "--width", "16", "--out", str(out)) == 0
    assert f"{sampler.class_name} (sampler {name!r}), 3 steps" in capsys.readouterr().out
    expected = diffusers_image(pipeline_folder(family), sampler.class_name, sampler.options)
    assert_same_images(png(out), expected, f"--sampler {name!r}")


def test_scheduler_flag_takes_a_class_name_and_draws_diffusers_image(tmp_path, capsys):
    from .tiny_components import assert_same_images

    out = tmp_path / "x.png"
    assert generate("--model", str(pipeline_folder("tiny-sd")), "--scheduler", "KDPM2AncestralDiscreteScheduler",
                    "--steps", "3", "--height", "16", "--width", "16", "--out", str(out)) == 0
    assert "KDPM2AncestralDiscreteScheduler, 3 steps" in capsys.readouterr().out
    expected = diffusers_image(pipeline_folder("tiny-sd"), "KDPM2AncestralDiscreteScheduler", {})
    assert_same_images(png(out), expected, "--scheduler KDPM2AncestralDiscreteScheduler")


def test_help_lists_every_sampler_with_its_class_and_every_scheduler(capsys):
    from pare.schedulers import SCHEDULER_MODULES
    from pare.schedulers.samplers import SAMPLERS, describe

    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, sampler in SAMPLERS.items():
        assert f"{name} {describe(sampler)}" in text
    for name in SCHEDULER_MODULES:
        assert name in text


@pytest.mark.parametrize(("name", "message"), [
    ("Euler A", "unknown sampler 'Euler A'; known samplers: 'Euler', 'Euler a'"),
    ("DPM++ 2S a", "sampler 'DPM++ 2S a' is not available: ancestral single-step DPM-Solver++(2S); diffusers has "),
])
def test_unknown_sampler_is_a_usage_error_listing_the_known_ones(tmp_path, capsys, name, message):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        generate("--model", str(pipeline_folder("tiny-sd")), "--sampler", name, "--out", str(out))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "'DPM++ 2M Karras'" in err and "'LCM'" in err
    assert not out.exists()


def test_scheduler_and_sampler_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate("--model", str(pipeline_folder("tiny-sd")), "--scheduler", "DDIMScheduler", "--sampler", "Euler",
                 "--out", str(tmp_path / "x.png"))
    assert info.value.code == 2
    assert "argument --sampler: not allowed with argument --scheduler" in capsys.readouterr().err




# --- ControlNet and inpainting (issue 17) -------------------------------------------------------


def test_generate_with_a_controlnet_and_its_condition_image(tmp_path, capsys):
    import diffusers

    from pare.parity.controlnet_checkpoint import make_controlnet_checkpoint

    controlnet = make_controlnet_checkpoint(diffusers, tmp_path / "controlnet", "tiny-sd-pipe")
    edges, out = tmp_path / "edges.png", tmp_path / "cn.png"
    PIL.Image.new("RGB", (24, 16), "white").save(edges)
    assert generate("--model", str(pipeline_folder("tiny-sd")), "--controlnet", str(controlnet),
                    "--control-image", str(edges), "--controlnet-scale", "0.5", "--out", str(out)) == 0
    assert "StableDiffusionControlNetPipeline" in capsys.readouterr().out
    assert PIL.Image.open(out).size == (24, 16)  # the condition image sets the size


def test_generate_inpaints_with_a_mask(tmp_path, capsys):
    photo, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    PIL.Image.new("RGB", (16, 16), "blue").save(photo)
    PIL.Image.new("L", (16, 16), 255).save(mask)
    assert generate("--model", str(pipeline_folder("tiny-sd")), "--image", str(photo), "--mask", str(mask),
                    "--height", "16", "--width", "16", "--out", str(out)) == 0
    assert "StableDiffusionInpaintPipeline" in capsys.readouterr().out  # the 4-channel UNet: blend mode
    assert PIL.Image.open(out).size == (16, 16)


@pytest.mark.parametrize("flags, message", [
    (["--mask", "MASK"], "--mask is for inpainting: give the --image"),
    (["--controlnet", "DIR"], "--controlnet and --control-image go together"),
    (["--controlnet", "DIR", "--control-image", "MASK", "--image", "MASK"], "ControlNet with --image"),
])
def test_controlnet_and_mask_flags_are_checked(tmp_path, capsys, flags, message):
    mask = tmp_path / "mask.png"
    PIL.Image.new("L", (16, 16), 255).save(mask)
    flags = [str(mask) if f == "MASK" else f for f in flags]
    with pytest.raises(SystemExit) as info:
        generate("--model", str(pipeline_folder("tiny-sd")), *flags, "--out", str(tmp_path / "x.png"))
    assert info.value.code == 2 and message in capsys.readouterr().err
