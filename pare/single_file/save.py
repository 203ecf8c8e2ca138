"""`save_single_file`: a pipeline (or one UNet / VAE) written back in the original single-file layout.

The inverse of loader.py, through the same tables: each diffusers tensor goes to its original
name, reshaped back (`keymap.to_original`), and OpenCLIP's q, k and v are fused into one in_proj.
Where a text encoder goes depends on the pipeline: SD's at `cond_stage_model.transformer.`
(OpenAI CLIP, `hidden_act="quick_gelu"`) or `cond_stage_model.model.` (OpenCLIP, SD 2.x's
`gelu`); SDXL's at `conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.`.
A file written here loads back into the same tensors, in pare and in diffusers.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from safetensors.torch import save_file

from .clip_map import OPENAI_CLIP_MAP, OPENCLIP_MAP
from .families import OPENAI_SD, OPENAI_SDXL, OPENCLIP_SD2, OPENCLIP_SDXL, UNET_PREFIX, VAE_PREFIX
from .keymap import to_original
from .unet_map import UNET_MAP
from .vae_map import VAE_MAP


def original_state_dict(model: torch.nn.Module, prefix: str, keymap, config: dict) -> dict[str, torch.Tensor]:
    """One model's tensors under their original names."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    bare = {k.removeprefix("text_model."): k for k in state}
    grouped = defaultdict(list)
    for bare_key, name in keymap.names(bare, config).items():
        grouped[prefix + name.original].append((name.reshape, _host(state[bare[bare_key]])))
    return {key: to_original(parts).contiguous() for key, parts in grouped.items()}


def text_encoder_slots(pipe) -> list:
    if hasattr(pipe, "text_encoder_2"):
        return [(pipe.text_encoder, OPENAI_SDXL), (pipe.text_encoder_2, OPENCLIP_SDXL)]
    openclip = getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") != "quick_gelu"
    return [(pipe.text_encoder, OPENCLIP_SD2 if openclip else OPENAI_SD)]


def save_single_file(obj, path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Write a pare pipeline, UNet or VAE as one original-layout `.safetensors` file; `dtype` casts floats (fp16 files)."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.unet_2d_condition import UNet2DConditionModel

    tensors = {}
    if isinstance(obj, UNet2DConditionModel):
        parts = [(obj, UNET_PREFIX, UNET_MAP, obj.config)]
    elif isinstance(obj, AutoencoderKL):
        parts = [(obj, VAE_PREFIX, VAE_MAP, obj.config)]
    else:
        parts = [(obj.unet, UNET_PREFIX, UNET_MAP, obj.unet.config), (obj.vae, VAE_PREFIX, VAE_MAP, obj.vae.config)]
        for encoder, slot in text_encoder_slots(obj):
            parts.append((encoder, slot.prefix, OPENCLIP_MAP if slot.format == "openclip" else OPENAI_CLIP_MAP, {}))
    for model, prefix, keymap, config in parts:
        tensors.update(original_state_dict(model, prefix, keymap, config))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), {"format": "pt"})
    return str(path)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor if tensor.is_meta else tensor.cpu()  # meta models map names without data (tests, inspection)
