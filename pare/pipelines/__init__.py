"""Pipelines: text-to-image and image-to-image for Stable Diffusion 1.x/2.x and SDXL, four steps each.

    encode_prompt -> get_latent -> denoise -> vae_decode

`stable_diffusion.py` writes the steps out; `stable_diffusion_xl.py` replaces the first and the
last with SDXL's; `pipeline_utils.py` holds loading, seeded noise and image conversion.
`controlnet.py` adds the ControlNet step to denoise; `inpaint.py` the mask (prepare_mask) and the blend;
`upscale.py` is the SD2 x4 upscaler; `image_inputs.py` reads condition images and masks.
"""

from .controlnet import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from .inpaint import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from .pipeline_utils import PipelineOutput, randn_tensor
from .stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from .upscale import StableDiffusionUpscalePipeline

__all__ = [
    "PipelineOutput",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionUpscalePipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLPipeline",
    "randn_tensor",
]
