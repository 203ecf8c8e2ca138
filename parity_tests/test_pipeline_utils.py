"""pare/pipelines/pipeline_utils.py against its diffusers twins: noise, guidance rescale, images in and out."""

import numpy as np
import PIL.Image
import pytest
import torch

from pare.pipelines.pipeline_utils import postprocess_image, preprocess_image, randn_tensor, rescale_noise_cfg

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: E402
    rescale_noise_cfg as diffusers_rescale_noise_cfg,
)
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor  # noqa: E402


@pytest.mark.parametrize("generators", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_randn_tensor_draws_what_diffusers_draws(generators, dtype):
    def make():
        if generators is None:
            return torch.Generator().manual_seed(5)
        return [torch.Generator().manual_seed(5 + i) for i in range(generators)]

    shape = (3, 4, 5, 6)
    ours = randn_tensor(shape, generator=make(), device="cpu", dtype=dtype)
    theirs = diffusers_randn_tensor(shape, generator=make(), device=torch.device("cpu"), dtype=dtype)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_randn_tensor_refuses_a_generator_on_another_accelerator():
    class FakeGenerator:
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="cannot draw noise"):
        randn_tensor((1, 4), generator=FakeGenerator(), device="cpu")


def test_rescale_noise_cfg_matches_diffusers():
    gen = torch.Generator().manual_seed(0)
    cfg, text = torch.randn(2, 4, 8, 8, generator=gen) * 3, torch.randn(2, 4, 8, 8, generator=gen)
    torch.testing.assert_close(rescale_noise_cfg(cfg, text, 0.7), diffusers_rescale_noise_cfg(cfg, text, 0.7),
                               rtol=0, atol=0)


def images():
    rng = np.random.default_rng(0)
    pil = PIL.Image.fromarray(rng.integers(0, 256, (19, 27, 3), dtype=np.uint8))
    return {
        "pil (Lanczos resize)": pil,
        "pil list": [pil, pil.transpose(PIL.Image.FLIP_LEFT_RIGHT)],
        "numpy HWC": rng.random((19, 27, 3), dtype=np.float32),
        "numpy BHWC": rng.random((2, 16, 24, 3), dtype=np.float32),
        "tensor CHW": torch.rand(3, 19, 27, generator=torch.Generator().manual_seed(1)),
        "tensor BCHW": torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)),
        "latents pass through": torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3)),
    }


@pytest.mark.parametrize("name", list(images()))
@pytest.mark.parametrize("vae_scale_factor", [2, 8])
def test_preprocess_matches_vae_image_processor(name, vae_scale_factor):
    image = images()[name]
    ours = preprocess_image(image, vae_scale_factor)
    theirs = VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(image)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("output_type", ["np", "pt", "latent", "pil"])
def test_postprocess_matches_vae_image_processor(output_type):
    decoded = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 0.8
    ours = postprocess_image(decoded, output_type)
    theirs = VaeImageProcessor().postprocess(decoded, output_type=output_type)
    if output_type == "pil":
        ours, theirs = np.stack([np.array(i) for i in ours]), np.stack([np.array(i) for i in theirs])
    if isinstance(ours, np.ndarray):
        np.testing.assert_array_equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_preprocess_refuses_what_is_not_an_image():
    with pytest.raises(ValueError, match="must be a PIL image, a numpy array or a torch tensor"):
        preprocess_image("cat.png", 8)
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess_image([], 8)
