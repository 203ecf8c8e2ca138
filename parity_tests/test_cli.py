"""`pare generate`, run in-process through `pare.cli.main` on the tiny pipeline folders."""

import json
import shutil

import PIL.Image
import pytest

from pare.cli import main

from .tiny_components import pipeline_folder


def generate(*args: str) -> int:
    return main(["generate", "--prompt", "a photo of the cat", "--steps", "2", "--seed", "0", *args])


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


def test_folder_naming_an_unimplemented_scheduler_works_with_scheduler_flag(tmp_path, capsys):
    """SD1.5's folder names PNDMScheduler: without --scheduler a clear error; with it, an image."""
    pndm = shutil.copytree(pipeline_folder("tiny-sd"), tmp_path / "pipe")
    index = json.loads((pndm / "model_index.json").read_text())
    (pndm / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    out = tmp_path / "x.png"
    assert generate("--model", str(pndm), "--height", "16", "--width", "16", "--out", str(out)) == 1
    assert "names PNDMScheduler, which pare does not implement; pass --scheduler" in capsys.readouterr().err
    assert generate("--model", str(pndm), "--scheduler", "DDIMScheduler", "--height", "16", "--width", "16",
                    "--out", str(out)) == 0
    assert out.exists()


# --- ControlNet and inpainting (issue 17) -------------------------------------------------------


def test_generate_with_a_controlnet_and_its_condition_image(tmp_path, capsys):
    import diffusers

    from pare.controlnet_checkpoint import make_controlnet_checkpoint

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
