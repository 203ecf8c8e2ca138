"""Pipeline arguments beyond issue 15's list: SDXL's embeddings and clip_skip, img2img images, eta by scheduler.

Where diffusers computes something sensible, pare must too: those cases run and match diffusers."""

import numpy as np
import PIL.Image
import pytest
import torch

import pare

from .tiny_components import assert_same_images, build_diffusers_pipeline, pipeline_folder


@pytest.fixture(scope="module")
def sd():
    pipe = pare.StableDiffusionPipeline.from_pretrained(pipeline_folder("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    pipe = pare.StableDiffusionXLPipeline.from_pretrained(pipeline_folder("tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


SMALL = dict(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="np")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(clip_skip=3), "`clip_skip`=3 reaches below the text encoder's first layer; it counts layers back from the "
                        "last, so it must be in [0, 2]"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64), pooled_prompt_embeds=torch.zeros(1, 31)),
     "`pooled_prompt_embeds` has shape (1, 31); it must be (batch, 32)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 64), pooled_prompt_embeds=torch.zeros(1, 32)),
     "the embeddings have different batch sizes"),
    (dict(original_size=(16, -1)), "`original_size`=(16, -1) has entry [1] = -1"),
    (dict(crops_coords_top_left=(0.5, 0)), "`crops_coords_top_left`=(0.5, 0) has entry [0] = 0.5, which is a float"),
    (dict(guidance_scale="7"), "`guidance_scale`='7' is a str"),
])
def test_bad_sdxl_arguments_are_refused(sdxl, kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:
        sdxl(**{**SMALL, **kwargs})
    assert message in str(info.value)


def test_sdxl_img2img_checks_its_arguments_too(sdxl):
    pipe = pare.StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    with pytest.raises(ValueError, match="`eta`=-1 is out of range"):
        pipe(prompt="a", image=torch.rand(1, 3, 16, 16), eta=-1, num_inference_steps=2)


@pytest.mark.parametrize(("image", "message"), [
    (PIL.Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "mode 'I;16', which pare does not convert"),
    (PIL.Image.new("F", (16, 16)), "mode 'F'"),
    (PIL.Image.new("RGB", (1, 1)), "`image` is 1 x 1 pixels; the VAE needs at least 2 x 2"),
    (np.zeros((16, 16, 3), dtype=np.uint8), "is an array of uint8; arrays and tensors must be float"),
    (torch.full((1, 3, 16, 16), float("nan")), "`image` holds NaN or inf"),
    ([PIL.Image.new("RGB", (16, 16)), PIL.Image.new("I;16", (16, 16))], "`image[1]` is a PIL image of mode 'I;16'"),
])
def test_images_the_vae_cannot_take_are_refused_by_name(sd, image, message):
    pipe = pare.StableDiffusionImg2ImgPipeline(**sd.components)
    with pytest.raises((ValueError, TypeError)) as info:
        pipe(prompt="a", image=image, num_inference_steps=2)
    assert message in str(info.value)


def test_an_odd_sized_rgb_image_is_cut_down_as_in_diffusers(sd):
    """13 x 21 pixels: both libraries cut the sides to a multiple of the VAE's factor and give the same image."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8))
    ours = pare.StableDiffusionImg2ImgPipeline(**sd.components)
    import diffusers

    reference = diffusers.StableDiffusionImg2ImgPipeline(**build_diffusers_pipeline("tiny-sd").components)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a", image=image, strength=0.5, num_inference_steps=2, output_type="np")
    out = ours(**kwargs, generator=torch.Generator().manual_seed(0)).images
    ref = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == ref.shape == (1, 12, 20, 3)
    assert_same_images(out, ref, "img2img 13x21")


def test_eta_out_of_ddims_range_is_refused_but_ignored_by_ddpm_as_in_diffusers(sd):
    with pytest.raises(ValueError, match=r"`eta`=1.5 is out of range; it must be a finite number in \[0, 1\]"):
        sd(**SMALL, eta=1.5)
    ddpm = pare.StableDiffusionPipeline(**{**sd.components, "scheduler": pare.DDPMScheduler.from_config(
        sd.scheduler.config)})
    ddpm.set_progress_bar_config(disable=True)
    out = ddpm(**SMALL, eta=1.5, generator=torch.Generator().manual_seed(0)).images  # DDPM has no eta
    same = ddpm(**SMALL, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(out, same)
    with pytest.raises(TypeError, match="`eta`='x' is a str"):
        ddpm(**SMALL, eta="x")
