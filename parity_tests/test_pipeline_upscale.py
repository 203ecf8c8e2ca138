"""pare's SD2 x4 upscaler pipeline against diffusers': same seeds, the same latents after every step."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import pare
from pare.configs import (
    TINY_TEXT,
    TINY_X4_UPSCALER_UNET,
    TINY_X4_UPSCALER_VAE,
    X4_UPSCALER_LOW_RES_SCHEDULER,
    X4_UPSCALER_SCHEDULER,
)
from pare.parity.checkpoint import build_reference_pipeline, pare_twin
from pare.parity import assert_parity
from parity_tests.tiny_components import assert_same_images, generators, record_run

_PIPES = {}


def strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def pipelines():
    if not _PIPES:
        base = build_reference_pipeline(diffusers, (TINY_X4_UPSCALER_UNET, TINY_X4_UPSCALER_VAE, TINY_TEXT, None),
                                        strip(X4_UPSCALER_SCHEDULER), seed=0)
        low_res = strip(X4_UPSCALER_LOW_RES_SCHEDULER)
        theirs = diffusers.StableDiffusionUpscalePipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            low_res_scheduler=diffusers.DDPMScheduler.from_config(low_res), scheduler=base.scheduler)
        theirs.set_progress_bar_config(disable=True)
        parts = pare_twin(base).components
        ours = pare.StableDiffusionUpscalePipeline(**parts, low_res_scheduler=pare.DDPMScheduler.from_config(low_res))
        ours.set_progress_bar_config(disable=True)
        _PIPES["x4"] = ours, theirs
    return _PIPES["x4"]


def low_res(seed: int = 0, side: int = 12) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))


CASES = {
    "defaults (CFG 9, noise level 20)": {},
    "noise level 150, 2 images, generator list": {"noise_level": 150, "num_images_per_prompt": 2, "n_generators": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_upscale_pipeline_matches_diffusers_step_by_step(case):
    # diffusers' upscale pipeline has only the old per-step callback(step, t, latents).
    ours, theirs = pipelines()
    kwargs = {"prompt": "a cat", "image": low_res(), "num_inference_steps": 3, "output_type": "np", **CASES[case]}
    n = kwargs.pop("n_generators", None)
    our_steps, ours_images = record_run(ours, n_generators=n, **kwargs)
    their_steps = []
    theirs_images = theirs(generator=generators(0, n), callback=lambda i, t, x: their_steps.append(x.clone()),
                           callback_steps=1, **kwargs).images
    assert len(our_steps) == len(their_steps) == 3
    for i, (a, b) in enumerate(zip(our_steps, their_steps)):
        assert_parity(f"x4 upscaler, {case}: latents after step {i}", a, b, scope="end_to_end")
    assert_parity(f"x4 upscaler, {case}: image", torch.from_numpy(ours_images), torch.from_numpy(theirs_images),
                  scope="end_to_end")
    assert_same_images(ours_images, theirs_images, case)
    assert ours_images.shape[1:3] == (24, 24)  # the tiny VAE doubles; the official one (3 levels) quadruples


def test_upscale_inputs_are_checked():
    ours, _ = pipelines()
    with pytest.raises(ValueError, match=r"`noise_level` must be in \[0, max_noise_level = 350\], got 351"):
        ours("a cat", image=low_res(), noise_level=351)
    with pytest.raises(ValueError, match=r"needs the low-resolution `image`"):
        ours("a cat")
    bad_vae = pare.AutoencoderKL.from_config({**TINY_X4_UPSCALER_VAE, "scaling_factor": 0.18215})
    with pytest.raises(ValueError, match=r"scaling_factor=0.18215: set it to 0.08333"):
        pare.StableDiffusionUpscalePipeline(**{**ours.components, "vae": bad_vae})
