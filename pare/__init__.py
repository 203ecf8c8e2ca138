"""pare: Stable Diffusion, one readable component at a time, verified against diffusers.

The pipeline is four steps, each in its own file:

    encode_prompt  (pare/pipelines)    text -> CLIP embeddings
    get_latent     (pare/pipelines)    seeded Gaussian noise in latent space
    denoise        (pare/models/unet_2d_condition.py + pare/schedulers)
    vae_decode     (pare/models/autoencoder_kl.py)

Public names are imported on first use, so `import pare` stays light and this table says
where each one lives.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "pare.configuration",
    "ConfigMixin": "pare.configuration",
    "WeightLoadError": "pare.loading",
    "ModelMixin": "pare.models.modeling",
    "UNet2DConditionModel": "pare.models.unet_2d_condition",
    "AutoencoderKL": "pare.models.autoencoder_kl",
    "ControlNetModel": "pare.models.controlnet",
    "MultiControlNetModel": "pare.models.multicontrolnet",
    "DDIMScheduler": "pare.schedulers",
    "DDPMScheduler": "pare.schedulers",
    "save_single_file": "pare.single_file",
    "SingleFileError": "pare.single_file",
    "PNDMScheduler": "pare.schedulers",
    "EulerDiscreteScheduler": "pare.schedulers",
    "EulerAncestralDiscreteScheduler": "pare.schedulers",
    "HeunDiscreteScheduler": "pare.schedulers",
    "KDPM2DiscreteScheduler": "pare.schedulers",
    "KDPM2AncestralDiscreteScheduler": "pare.schedulers",
    "LMSDiscreteScheduler": "pare.schedulers",
    "DPMSolverMultistepScheduler": "pare.schedulers",
    "DPMSolverSinglestepScheduler": "pare.schedulers",
    "UniPCMultistepScheduler": "pare.schedulers",
    "DEISMultistepScheduler": "pare.schedulers",
    "LCMScheduler": "pare.schedulers",
    "EDMEulerScheduler": "pare.schedulers",
    "EDMDPMSolverMultistepScheduler": "pare.schedulers",
    "StableDiffusionPipeline": "pare.pipelines",
    "StableDiffusionImg2ImgPipeline": "pare.pipelines",
    "StableDiffusionXLPipeline": "pare.pipelines",
    "StableDiffusionXLImg2ImgPipeline": "pare.pipelines",
    "StableDiffusionControlNetPipeline": "pare.pipelines",
    "StableDiffusionInpaintPipeline": "pare.pipelines",
    "StableDiffusionUpscalePipeline": "pare.pipelines",
    "StableDiffusionXLInpaintPipeline": "pare.pipelines",
    "StableDiffusionXLControlNetPipeline": "pare.pipelines",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pare' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
