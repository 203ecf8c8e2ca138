"""pare.StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline against diffusers', end to end.

As in test_pipeline_sd.py: one folder written by diffusers, loaded by both; the latents after
every step and the final image must agree (float32 rel L2 <= 1e-4; uint8 images equal except for
one level in at most 1% of values). On top of SD: two text encoders, the pooled embedding,
`add_time_ids` from original_size / crops_coords_top_left / target_size, and SDXL's zeroed
unconditional embeddings.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import pare
from pare.schedulers import SCHEDULERS

from .tiny_components import assert_same_run, pipeline_folder, scheduler_cases

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder():
    return pipeline_folder("tiny-sdxl")


@pytest.fixture(scope="module")
def loaded(folder):
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ours = pare.StableDiffusionXLPipeline.from_pretrained(folder)
    return ours, theirs


def pipelines(loaded, folder, scheduler="DDIMScheduler", img2img=False, force_zeros_for_empty_prompt=True):
    ours, theirs = loaded
    our_cls = pare.StableDiffusionXLImg2ImgPipeline if img2img else pare.StableDiffusionXLPipeline
    their_cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    ours = our_cls(**{**ours.components, "scheduler": SCHEDULERS[scheduler].from_config(folder / "scheduler")},
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    their_scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    theirs = their_cls(**{**theirs.components, "scheduler": their_scheduler}, add_watermarker=False,
                       force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


TXT2IMG_CASES = {
    "cfg": dict(prompt="a photo of the cat", num_inference_steps=3),
    "batch_negative_eta_generator_list": dict(prompt=["a cat", "the dog"], negative_prompt="blurry",
                                              num_images_per_prompt=2, eta=0.5, n_generators=4, num_inference_steps=2),
    "micro_conditioning": dict(prompt="a cat", original_size=(64, 80), crops_coords_top_left=(3, 5),
                               target_size=(40, 40), num_inference_steps=2),
    # diffusers tiles these ids (negative, positive) per image while the embeddings hold all negatives
    # first; with two images that pairing shows, and pare keeps it.
    "negative_micro_conditioning_batch": dict(prompt=["a cat", "on"], negative_original_size=(16, 16),
                                              negative_crops_coords_top_left=(2, 2), negative_target_size=(24, 24),
                                              num_inference_steps=2),
    "prompt_2_and_negative_2": dict(prompt="a cat", prompt_2="the tin", negative_prompt="dark",
                                    negative_prompt_2="blurry", num_inference_steps=2),
    "cfg_off": dict(prompt="a cat", guidance_scale=1.0, num_inference_steps=2),
    "guidance_rescale": dict(prompt="a cat", guidance_rescale=0.7, num_inference_steps=2),
    "clip_skip": dict(prompt="a cat", clip_skip=1, negative_prompt="dark", num_inference_steps=2),
    "non_square": dict(prompt="on the tin", height=16, width=24, num_inference_steps=2),
}


@pytest.mark.parametrize(("case", "scheduler"), scheduler_cases(TXT2IMG_CASES, ("cfg", "micro_conditioning")))
def test_sdxl_txt2img_matches_diffusers_step_by_step(loaded, folder, case, scheduler):
    ours, theirs = pipelines(loaded, folder, scheduler)
    assert_same_run(ours, theirs, f"{case}/{scheduler}", **{"height": 16, "width": 16, **TXT2IMG_CASES[case]})


def test_encoded_negative_prompt_when_zeros_are_off(loaded, folder):
    """force_zeros_for_empty_prompt=False: the unconditional half is the encoded "" instead of zeros."""
    ours, theirs = pipelines(loaded, folder, force_zeros_for_empty_prompt=False)
    assert_same_run(ours, theirs, "no zeros", prompt="a cat", num_inference_steps=2, height=16, width=16)


def test_sdxl_prompt_embeds_match_diffusers_and_drive_the_same_image(loaded, folder):
    ours, theirs = pipelines(loaded, folder)
    our_embeds = ours.encode_prompt("a cat", None, 2, True, negative_prompt="dark")
    their_embeds = theirs.encode_prompt("a cat", device="cpu", num_images_per_prompt=2,
                                        do_classifier_free_guidance=True, negative_prompt="dark")
    for a, b in zip(our_embeds, their_embeds):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cond, uncond, pooled, uncond_pooled = (e[:1] for e in their_embeds)
    assert_same_run(ours, theirs, "prompt_embeds", prompt_embeds=cond, negative_prompt_embeds=uncond,
                    pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=uncond_pooled,
                    num_inference_steps=2, height=16, width=16)


def test_force_zeros_option_is_read_from_model_index(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "pipe")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert pare.StableDiffusionXLPipeline.from_pretrained(copy).force_zeros_for_empty_prompt is False


def test_sdxl_from_pretrained_names_the_missing_second_encoder(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "pipe")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ValueError, match="text_encoder_2: model_index.json lists CLIPTextModelWithProjection"):
        pare.StableDiffusionXLPipeline.from_pretrained(broken)


# --- img2img --------------------------------------------------------------------------------------


def sample_image(height=18, width=21):
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMG2IMG_CASES = {
    "pil_strength": dict(prompt="a cat", image=sample_image(), strength=0.6, num_inference_steps=5),
    "batch_generator_list": dict(prompt=["a cat", "the dog"], image=sample_image(), strength=0.5,
                                 num_images_per_prompt=2, n_generators=4, num_inference_steps=4),
    # diffusers' img2img gives the negative ids the *positive* crop coordinates; pare keeps that.
    "micro_conditioning": dict(prompt="a cat", image=sample_image(), strength=0.5, num_inference_steps=4,
                               original_size=(48, 48), crops_coords_top_left=(4, 0),
                               negative_original_size=(16, 16), negative_crops_coords_top_left=(9, 9),
                               guidance_rescale=0.5),
    "tensor_full_strength": dict(prompt="a cat", image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
                                 strength=1.0, num_inference_steps=2),
}


@pytest.mark.parametrize(("case", "scheduler"), scheduler_cases(IMG2IMG_CASES, ("pil_strength",)))
def test_sdxl_img2img_matches_diffusers_step_by_step(loaded, folder, case, scheduler):
    ours, theirs = pipelines(loaded, folder, scheduler, img2img=True)
    kwargs = IMG2IMG_CASES[case]
    steps, _ = assert_same_run(ours, theirs, f"img2img {case}/{scheduler}", **kwargs)
    assert len(steps) == int(kwargs["num_inference_steps"] * kwargs["strength"])


# --- bad input ------------------------------------------------------------------------------------


BAD_INPUT = {
    "embeds without pooled": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64)), "pooled_prompt_embeds"),
    "prompt_2 count": (dict(prompt=["a", "b"], prompt_2=["c"]), "`prompt_2` has 1 entries but there are 2 prompts"),
    "negative prompt count": (dict(prompt=["a", "b"], negative_prompt=["c"]), "has 1 entries but there are 2"),
    "width not a multiple of 8": (dict(width=20), "multiples of 8"),
    "generator count": (dict(generator=[torch.Generator()] * 2), "2 generators were passed for 1 images"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_sdxl_input_raises_before_any_work(loaded, case):
    ours, _ = loaded
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *a: seen.append(1)) for m in ours.models()]
    kwargs, message = BAD_INPUT[case]
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            ours(**{"prompt": "a", "num_inference_steps": 2, "height": 16, "width": 16, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == []


@pytest.mark.parametrize(("strength", "message"), [(0.0, "(0, 1]"), (1.01, "(0, 1]"), (0.1, "no denoising step")])
def test_bad_sdxl_strength(loaded, folder, strength, message):
    ours, _ = pipelines(loaded, folder, img2img=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        ours(prompt="a", image=sample_image(), strength=strength, num_inference_steps=5)


# --- GPU tier: official SDXL configs ---------------------------------------------------------------


@pytest.mark.official
def test_sdxl_official_config_matches_diffusers(device, dtype):
    """SDXL base's official UNet and VAE configs (random weights, 2.6 B UNet parameters), two-layer
    CLIPs of SDXL's widths (768 + 1280, pooled 1280), 16 tokens, 256 x 256 pixels, 3 DDIM steps.

    Judged as test_pipeline_sd's official test: in float32 by the tight end-to-end tolerance;
    below it by the error budget against diffusers run in float64 from the same weights and noise
    (SDXL's VAE decodes in float32 under force_upcast in both libraries).
    """
    from .tiny_components import assert_official_run, official_pipelines

    ours, theirs = official_pipelines("sdxl", device, dtype)
    assert_official_run(ours, theirs, dtype, prompt="an astronaut", height=256, width=256,
                        num_inference_steps=3)
