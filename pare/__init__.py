"""pare: Stable Diffusion, one readable component at a time, verified against diffusers.

The pipeline is four steps, each in its own file:

    encode_prompt  (pare/pipelines)    text -> CLIP embeddings
    get_latent     (pare/pipelines)    seeded Gaussian noise in latent space
    denoise        (pare/models/unet_2d_condition.py + pare/schedulers)
    vae_decode     (pare/models/autoencoder_kl.py)
"""

__version__ = "0.1.0"

from .configuration import Config, ConfigMixin
from .loading import WeightLoadError
from .models import ModelMixin

__all__ = ["Config", "ConfigMixin", "ModelMixin", "WeightLoadError", "__version__"]
