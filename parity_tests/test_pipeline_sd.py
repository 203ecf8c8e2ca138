"""pare.StableDiffusionPipeline and StableDiffusionImg2ImgPipeline against diffusers', end to end.

Both libraries load one folder that diffusers wrote (`tiny_components.pipeline_folder`) and run
with the same arguments and seeds. `assert_same_run` checks the latents after every step (through
`callback_on_step_end`) and the final image: float32 rel L2 <= 1e-4 (the end-to-end tolerance),
and uint8 images equal except for one level in at most 1% of values.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import pare
from pare.schedulers import SCHEDULERS

from .tiny_components import (
    assert_same_run,
    diffusers_clip_skip_shim,
    pipeline_folder,
    record_run,
    scheduler_cases,
    to_uint8,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder():
    return pipeline_folder("tiny-sd")


@pytest.fixture(scope="module")
def loaded(folder):
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    diffusers_clip_skip_shim(theirs)
    ours = pare.StableDiffusionPipeline.from_pretrained(folder)
    return ours, theirs


def pipelines(loaded, folder, scheduler: str = "DDIMScheduler", img2img: bool = False):
    """pare's and diffusers' pipelines on the loaded components, each with a fresh `scheduler` built from the folder's config."""
    ours, theirs = loaded
    our_cls = pare.StableDiffusionImg2ImgPipeline if img2img else pare.StableDiffusionPipeline
    their_cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    ours = our_cls(**{**ours.components, "scheduler": SCHEDULERS[scheduler].from_config(folder / "scheduler")})
    their_scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    theirs = their_cls(**{**theirs.components, "scheduler": their_scheduler})
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


# The first two cases run with every scheduler pare has; the rest, which exercise the pipeline
# rather than the scheduler, with DDIM only. 16 x 16 pixels (8 x 8 latents) keep them fast.
TXT2IMG_CASES = {
    "cfg": dict(prompt="a photo of the cat", num_inference_steps=3),
    "batch_negative_eta_generator_list": dict(prompt=["a cat", "the dog"], negative_prompt=["blurry", "dark"],
                                              num_images_per_prompt=2, eta=0.5, n_generators=4, num_inference_steps=2),
    "cfg_off": dict(prompt="a cat", guidance_scale=1.0, num_inference_steps=2),
    "guidance_rescale": dict(prompt="a cat", guidance_rescale=0.7, num_inference_steps=2),
    "clip_skip": dict(prompt="a cat", clip_skip=1, negative_prompt="dark", num_inference_steps=2),
    "non_square": dict(prompt="on the tin", height=16, width=24, num_inference_steps=2),
}


@pytest.mark.parametrize(("case", "scheduler"), scheduler_cases(TXT2IMG_CASES, ("cfg", "batch_negative_eta_generator_list")))
def test_txt2img_matches_diffusers_step_by_step(loaded, folder, case, scheduler):
    ours, theirs = pipelines(loaded, folder, scheduler)
    assert_same_run(ours, theirs, f"{case}/{scheduler}", **{"height": 16, "width": 16, **TXT2IMG_CASES[case]})


def test_prompt_embeds_match_diffusers_and_drive_the_same_image(loaded, folder):
    ours, theirs = pipelines(loaded, folder)
    cond, uncond = ours.encode_prompt(["a cat", "on"], 2, True, negative_prompt="dark")
    their_cond, their_uncond = theirs.encode_prompt(["a cat", "on"], "cpu", 2, True, negative_prompt=["dark"] * 2)
    torch.testing.assert_close(cond, their_cond, rtol=0, atol=0)
    torch.testing.assert_close(uncond, their_uncond, rtol=0, atol=0)
    embeds = dict(prompt_embeds=their_cond[::2], negative_prompt_embeds=their_uncond[::2])
    assert_same_run(ours, theirs, "prompt_embeds", num_inference_steps=2, num_images_per_prompt=2, height=16, width=16,
                    **embeds)


def test_given_latents_and_custom_timesteps_match_diffusers(loaded, folder):
    ours, theirs = pipelines(loaded, folder, "DDPMScheduler")  # DDPM takes custom timesteps, DDIM does not
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert_same_run(ours, theirs, "latents+timesteps", prompt="a cat", latents=latents, height=16, width=16,
                    timesteps=[901, 501, 1])


def test_callback_can_replace_the_latents_as_in_diffusers(loaded, folder):
    """A callback's returned latents are the next step's input, in both libraries."""
    ours, theirs = pipelines(loaded, folder)

    def halve_after_first_step(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * 0.5} if step == 0 else {}

    kwargs = dict(prompt="a cat", num_inference_steps=3, height=16, width=16, output_type="np",
                  callback_on_step_end=halve_after_first_step)
    ours_images = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    theirs_images = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = ours(generator=torch.Generator().manual_seed(0), **{**kwargs, "callback_on_step_end": None}).images
    np.testing.assert_allclose(ours_images, theirs_images, rtol=0, atol=1e-6)
    assert np.abs(ours_images - plain).max() > 1e-3  # the callback changed the run


def test_outdated_scheduler_config_is_rewritten_as_diffusers_does(loaded, folder):
    """DDIMScheduler's defaults (steps_offset=0, clip_sample=True) are what SD pipelines rewrite on construction."""
    ours, theirs = loaded
    ours = pare.StableDiffusionPipeline(**{**ours.components, "scheduler": pare.DDIMScheduler()})
    theirs = diffusers.StableDiffusionPipeline(**{**theirs.components, "scheduler": diffusers.DDIMScheduler()})
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    assert_same_run(ours, theirs, "legacy scheduler", prompt="a cat", num_inference_steps=3, height=16, width=16)


def test_output_types_agree(loaded, folder):
    ours, theirs = pipelines(loaded, folder)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=16, width=16)
    steps, array = record_run(ours, output_type="np", **kwargs)
    _, tensor = record_run(ours, output_type="pt", **kwargs)
    _, latents = record_run(ours, output_type="latent", **kwargs)
    _, pil = record_run(ours, output_type="pil", **kwargs)
    _, their_pil = record_run(theirs, output_type="pil", **kwargs)
    np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), array)
    torch.testing.assert_close(latents, steps[-1], rtol=0, atol=0)
    np.testing.assert_array_equal(np.stack([np.array(i) for i in pil]), to_uint8(array))
    np.testing.assert_array_equal(np.stack([np.array(i) for i in pil]), np.stack([np.array(i) for i in their_pil]))


# --- img2img --------------------------------------------------------------------------------------


def sample_image(height=18, width=21):
    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


IMG2IMG_CASES = {
    # 21 wide is cut to 20 (a multiple of the tiny VAE's factor 2), as VaeImageProcessor does.
    "pil_strength": dict(prompt="a cat", image=sample_image(), strength=0.6, num_inference_steps=5),
    "batch_generator_list": dict(prompt=["a cat", "the dog"], image=sample_image(), strength=0.6,
                                 num_images_per_prompt=2, n_generators=4, eta=0.3, num_inference_steps=4),
    "numpy_full_strength": dict(prompt="a cat", image=np.random.default_rng(1).random((16, 16, 3), dtype=np.float32),
                                strength=1.0, num_inference_steps=2),
    "tensor_two_images": dict(prompt="a cat", image=torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)),
                              strength=0.5, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=1.0),
}


@pytest.mark.parametrize(("case", "scheduler"), scheduler_cases(IMG2IMG_CASES, ("pil_strength",)))
def test_img2img_matches_diffusers_step_by_step(loaded, folder, case, scheduler):
    ours, theirs = pipelines(loaded, folder, scheduler, img2img=True)
    kwargs = IMG2IMG_CASES[case]
    steps, ours_images = assert_same_run(ours, theirs, f"img2img {case}/{scheduler}", **kwargs)
    assert len(steps) == int(kwargs["num_inference_steps"] * kwargs["strength"])  # SDEdit runs the tail only
    assert ours_images.shape[0] == (2 if isinstance(kwargs["prompt"], list) else 1) * kwargs.get("num_images_per_prompt", 1)


# --- loading --------------------------------------------------------------------------------------


@pytest.fixture
def count_loads(monkeypatch):
    """Count component loads, to show a failed check loads nothing."""
    from pare.pipelines import pipeline_utils

    calls = []
    load = pipeline_utils._load_component
    monkeypatch.setattr(pipeline_utils, "_load_component", lambda *a: calls.append(a[0]) or load(*a))
    return calls


def edit_index(folder, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_from_pretrained_names_a_missing_component_folder(folder, tmp_path, count_loads):
    broken = shutil.copytree(folder, tmp_path / "pipe")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"vae: model_index.json lists AutoencoderKL, but the folder .*vae does not exist"):
        pare.StableDiffusionPipeline.from_pretrained(broken)
    assert count_loads == []


def test_from_pretrained_names_a_component_missing_from_model_index(folder, tmp_path, count_loads):
    broken = shutil.copytree(folder, tmp_path / "pipe")
    edit_index(broken, unet=[None, None])
    index = json.loads((broken / "model_index.json").read_text())
    del index["text_encoder"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as info:
        pare.StableDiffusionPipeline.from_pretrained(broken)
    assert "text_encoder: missing from model_index.json" in str(info.value)
    assert "unet: missing from model_index.json" in str(info.value)
    assert count_loads == []


def test_from_pretrained_without_model_index(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pare.StableDiffusionPipeline.from_pretrained(shutil.copytree(folder / "unet", tmp_path / "unet"))


def test_unimplemented_scheduler_says_how_to_pass_one(folder, tmp_path, count_loads):
    """A folder naming a scheduler pare has not (DPMSolverSDEScheduler needs torchsde): a clear error, and scheduler= works."""
    sde = shutil.copytree(folder, tmp_path / "pipe")
    edit_index(sde, scheduler=["diffusers", "DPMSolverSDEScheduler"])
    with pytest.raises(ValueError, match=r"DPMSolverSDEScheduler, which pare does not implement.*scheduler="):
        pare.StableDiffusionPipeline.from_pretrained(sde)
    assert count_loads == []
    pipe = pare.StableDiffusionPipeline.from_pretrained(sde, scheduler=pare.DDIMScheduler.from_config(sde / "scheduler"))
    assert isinstance(pipe.scheduler, pare.DDIMScheduler)


def test_from_pretrained_dtype_and_to(folder):
    pipe = pare.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {m.dtype for m in pipe.models()} == {torch.bfloat16}
    pipe.to(torch.float32)
    assert {m.dtype for m in pipe.models()} == {torch.float32}
    assert pipe.to("cpu", torch.float64).dtype == torch.float64


def test_sdxl_folder_is_refused(loaded):
    ours, _ = loaded
    xl = pare.StableDiffusionXLPipeline.from_pretrained(pipeline_folder("tiny-sdxl"))
    with pytest.raises(ValueError, match="SDXL UNet"):
        pare.StableDiffusionPipeline(**{**ours.components, "unet": xl.unet})


# --- bad input: a clear error, and nothing run --------------------------------------------------------


BAD_TXT2IMG = {
    "height not a multiple of 8": (dict(prompt="a", height=30, width=32), "multiples of 8"),
    "negative prompt count": (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt` has 1 entries but there are 2"),
    "generator count": (dict(prompt=["a", "b"], num_images_per_prompt=2, generator=[torch.Generator()] * 3),
                        "3 generators were passed for 4 images"),
    "empty prompt list": (dict(prompt=[]), "empty list"),
    "prompt and embeds": (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), "exactly one of"),
    "output type": (dict(prompt="a", output_type="jpg"), "output_type"),
    "custom timesteps on DDIM": (dict(prompt="a", timesteps=[900, 500]), "custom `timesteps`"),
    "latents shape": (dict(prompt="a", latents=torch.zeros(1, 4, 5, 5)), "latents` has shape"),
    "callback tensor": (dict(prompt="a", callback_on_step_end_tensor_inputs=["noise_pred"]), "not available"),
}


@pytest.fixture
def calls(loaded):
    """Forward calls of the text encoder and the UNet during one test."""
    ours, _ = loaded
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.append(name))
             for name, m in (("text_encoder", ours.text_encoder), ("unet", ours.unet), ("vae", ours.vae))]
    yield seen
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("case", sorted(BAD_TXT2IMG))
def test_bad_txt2img_input_raises_before_any_work(loaded, calls, case):
    ours, _ = loaded
    kwargs, message = BAD_TXT2IMG[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        ours(**{"num_inference_steps": 2, **kwargs})
    assert calls == []


BAD_IMG2IMG = {
    "strength 0": (dict(strength=0.0), r"strength` must be in \(0, 1\]"),
    "strength above 1": (dict(strength=1.5), r"strength` must be in \(0, 1\]"),
    "strength too small for the steps": (dict(strength=0.05, num_inference_steps=10), "leaves no denoising step"),
    "no image": (dict(image=None), "needs an `image`"),
    "images do not spread over the batch": (dict(prompt=["a", "b", "c"], image=torch.rand(2, 3, 8, 8)),
                                            "2 images cannot be spread over 3 outputs"),
    "negative prompt count": (dict(prompt=["a", "b"], negative_prompt=["c", "d", "e"]), "has 3 entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMG2IMG))
def test_bad_img2img_input_raises_before_any_work(loaded, calls, case):
    ours, _ = loaded
    pipe = pare.StableDiffusionImg2ImgPipeline(**ours.components)
    kwargs, message = BAD_IMG2IMG[case]
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a", "image": sample_image(), "num_inference_steps": 4, **kwargs})
    assert calls == []


# --- GPU tier: official SD1.5 configs ----------------------------------------------------------------


@pytest.mark.official
def test_sd15_official_config_matches_diffusers(device, dtype):
    """SD1.5's official UNet and VAE configs (random weights), two-layer CLIP of SD1.5's width, 16 tokens.

    Both pipelines run in the session's precision on `device` from one noise tensor (drawn in
    float32 and cast: randn in float16 and float64 draw different numbers). In float32 the rule is
    the tight end-to-end tolerance. Below float32, diffusers' pipeline also runs in float64 from
    the same weights and noise, and the latents after every step and the image are judged by the
    error budget: pare no less accurate than diffusers against that float64 run.
    """
    from .tiny_components import official_pipelines, assert_official_run

    ours, theirs = official_pipelines("sd15", device, dtype)
    assert_official_run(ours, theirs, dtype, prompt="an astronaut", height=256, width=256,
                        num_inference_steps=3)
