"""pare's inpainting pipelines (SD and SDXL; 9-channel inpainting UNets and the 4-channel blend mode)
against diffusers': same seeds, the same latents after every step, the same images."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import pare
from pare.configs import TINY_SD_INPAINT_UNET, TINY_SD_UNET, TINY_SDXL_UNET, TINY_TEXT, TINY_VAE
from pare.parity.checkpoint import SCHEDULER, build_reference_pipeline, pare_twin
from parity_tests.tiny_components import assert_same_run

TINY_SDXL_INPAINT_UNET = {**TINY_SDXL_UNET, "in_channels": 9}
UNETS = {"sd-9": TINY_SD_INPAINT_UNET, "sd-4": TINY_SD_UNET, "sdxl-9": TINY_SDXL_INPAINT_UNET,
         "sdxl-4": TINY_SDXL_UNET}
_PIPES = {}


def pipelines(kind: str):
    """(pare, diffusers) inpainting pipelines with one set of seeded weights, built once per session."""
    if kind not in _PIPES:
        xl = kind.startswith("sdxl")
        base = build_reference_pipeline(diffusers, (UNETS[kind], TINY_VAE, TINY_TEXT, TINY_TEXT if xl else None),
                                        SCHEDULER, seed=0)
        cls = diffusers.StableDiffusionXLInpaintPipeline if xl else diffusers.StableDiffusionInpaintPipeline
        theirs = cls(**base.components)
        theirs.set_progress_bar_config(disable=True)
        ours = (pare.StableDiffusionXLInpaintPipeline if xl else pare.StableDiffusionInpaintPipeline)(
            **pare_twin(base).components)
        ours.set_progress_bar_config(disable=True)
        _PIPES[kind] = ours, theirs
    return _PIPES[kind]


def photo_and_mask(seed: int = 0, side: int = 32):
    rng = np.random.default_rng(seed)
    photo = PIL.Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 3 :] = 255  # repaint a rectangle
    return photo, PIL.Image.fromarray(mask)


# strength 1 (pure noise) runs in the SDXL blend case; the 9-channel path in the others.
CASES = {
    "sd-9, strength 0.6, 2 images, generator list": ("sd-9", {"strength": 0.6, "num_images_per_prompt": 2,
                                                             "n_generators": 2, "num_inference_steps": 4}),
    "sd-4 blend, strength 0.7, no CFG": ("sd-4", {"strength": 0.7, "guidance_scale": 1.0, "num_inference_steps": 4}),
    "sdxl-9, default strength": ("sdxl-9", {}),
    "sdxl-4 blend, strength 1": ("sdxl-4", {"strength": 1.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_inpaint_pipeline_matches_diffusers_step_by_step(case):
    kind, extra = CASES[case]
    ours, theirs = pipelines(kind)
    photo, mask = photo_and_mask()
    kwargs = {"prompt": "a red door", "image": photo, "mask_image": mask, "num_inference_steps": 2, **extra}
    assert_same_run(ours, theirs, f"inpaint {case}", **kwargs)


@torch.no_grad()
def test_blend_mode_keeps_the_unmasked_latents():
    # The last blend writes the image's clean latents into the kept region: the output latents equal them there.
    ours, _ = pipelines("sd-4")
    photo, mask = photo_and_mask(1)
    out = ours("a door", image=photo, mask_image=mask, num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    pixels = 2 * torch.from_numpy(np.asarray(photo, np.float32) / 255).permute(2, 0, 1)[None] - 1
    clean = ours.vae.encode(pixels).sample(torch.Generator().manual_seed(0)) * ours.vae.config.scaling_factor
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) < 128).float()[None, None],
                                           size=out.shape[-2:]) > 0.5
    assert torch.allclose(out.masked_select(keep.expand_as(out)), clean.masked_select(keep.expand_as(out)),
                          atol=1e-6)


def test_inpaint_inputs_are_checked():
    ours, _ = pipelines("sd-9")
    photo, mask = photo_and_mask()
    with pytest.raises(ValueError, match=r"needs an `image` and a `mask_image`"):
        ours("a door", image=photo, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`strength` must be in \(0, 1\]"):
        ours("a door", image=photo, mask_image=mask, strength=0.0)
