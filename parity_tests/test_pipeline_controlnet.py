"""pare's ControlNet pipelines (SD and SDXL) against diffusers': same seeds, the same latents after every step.

Both pipelines share one set of seeded random weights (`pare.parity.controlnet_checkpoint`: the tiny
pipelines of `pare parity` plus a ControlNet with random zero convolutions).
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import pare
from pare.parity.controlnet_checkpoint import (
    make_controlnet_checkpoint,
    pare_controlnet_twin,
    reference_controlnet,
    reference_controlnet_pipeline,
)
from parity_tests.tiny_components import assert_official_run, assert_same_run, pipeline_folder

_PIPES = {}


def pipelines(family: str, multi: bool = False):
    """(pare, diffusers) ControlNet pipelines for a tiny family, built once per session."""
    key = (family, multi)
    if key not in _PIPES:
        theirs = reference_controlnet_pipeline(diffusers, family)
        if multi:
            second = reference_controlnet(diffusers, "tiny-sd-pipe", seed=9)
            theirs = diffusers.StableDiffusionControlNetPipeline(
                **{**theirs.components, "controlnet": [theirs.controlnet, second]},
                requires_safety_checker=False)
        theirs.set_progress_bar_config(disable=True)
        ours = pare_controlnet_twin(theirs)
        ours.set_progress_bar_config(disable=True)
        _PIPES[key] = ours, theirs
    return _PIPES[key]


def edges(seed: int = 0, side: int = 32) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((side, side, 3)) > 0.7).astype(np.uint8) * 255)


SD_CASES = {
    "plain": {},
    # with 3 steps the window [0.3, 0.8] keeps only the middle one
    "scale and window": {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.3,
                         "control_guidance_end": 0.8, "num_inference_steps": 3},
    "guess mode": {"guess_mode": True, "controlnet_conditioning_scale": 0.8},
    "two prompts, two images each, no CFG": {"prompt": ["a cat", "the dog"], "num_images_per_prompt": 2,
                                             "guidance_scale": 1.0, "n_generators": 4},
}


@pytest.mark.parametrize("case", SD_CASES)
def test_sd_controlnet_pipeline_matches_diffusers_step_by_step(case):
    ours, theirs = pipelines("tiny")
    kwargs = {"prompt": "a photo of a house", "image": edges(), "num_inference_steps": 2, **SD_CASES[case]}
    steps, images = assert_same_run(ours, theirs, f"SD ControlNet, {case}", **kwargs)
    assert images.shape[1:3] == (32, 32)  # the condition image set the size


def test_multi_controlnet_pipeline_matches_diffusers():
    ours, theirs = pipelines("tiny", multi=True)
    assert isinstance(ours.controlnet, pare.MultiControlNetModel)
    assert_same_run(ours, theirs, "SD MultiControlNet", prompt="a house", image=[edges(0), edges(1)],
                    controlnet_conditioning_scale=[1.0, 0.4], control_guidance_end=[1.0, 0.5],
                    num_inference_steps=2)


def test_sdxl_controlnet_pipeline_in_guess_mode_matches_diffusers_step_by_step():
    # guess mode: the SDXL conditioning (pooled text, time ids) is halved for the ControlNet too
    ours, theirs = pipelines("tiny-sdxl")
    assert_same_run(ours, theirs, "SDXL ControlNet, guess mode", prompt="a photo of a house", image=edges(2),
                    num_inference_steps=2, guess_mode=True, controlnet_conditioning_scale=0.7)


def test_controlnet_pipeline_loads_folders_and_the_condition_sets_the_size(tmp_path):
    folder = make_controlnet_checkpoint(diffusers, tmp_path / "controlnet", "tiny-sd-pipe", seed=4)
    pipe = pare.StableDiffusionControlNetPipeline.from_pretrained(
        pipeline_folder("tiny-sd"), controlnet=pare.ControlNetModel.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", control_image=edges(side=24), num_inference_steps=1, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 24, 24, 3)
    with pytest.raises(ValueError, match=r"needs a condition image"):
        pipe("a cat", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"0 <= start < end <= 1"):
        pipe("a cat", image=edges(), control_guidance_start=0.6, control_guidance_end=0.4)


@pytest.mark.official
@pytest.mark.parametrize("family, side", [("sd15", 512), ("sdxl", 1024)])
def test_official_controlnet_pipelines_match_diffusers(device, dtype, family, side):
    """The official UNet, VAE and ControlNet configs at their native size, 2 steps, judged by the error budget."""
    theirs = reference_controlnet_pipeline(diffusers, family, device=device, model_max_length=16)
    theirs.set_progress_bar_config(disable=True)
    ours = pare_controlnet_twin(theirs, dtype)
    ours.set_progress_bar_config(disable=True)
    try:
        assert_official_run(ours, theirs, dtype, side, side, prompt="a house", image=edges(side=side),
                            num_inference_steps=2)
    finally:
        del ours, theirs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
