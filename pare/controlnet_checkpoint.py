"""Random-init ControlNet checkpoints and ControlNet pipelines at published configs, built by diffusers.

The ControlNet twin of `pare/parity/checkpoint.py` (same style, same seeding), for `pare parity
--components controlnet`, `pare bench` and the tests. No weights can be downloaded, so diffusers
(the reference module handed in, see `pare/parity/reference.py`) builds a `ControlNetModel` at a
config of `pare.configs.CONTROLNET_CONFIGS` with a seeded random init and writes it with its own
`save_pretrained`, in the official layout (config.json + diffusion_pytorch_model.safetensors).

One thing differs from a fresh diffusers init on purpose: the zero convolutions. At init they
make every residual exactly 0 (arXiv 2302.05543, eq. 1), so a parity check on them would pass
whatever the ControlNet computed. They are given a seeded random init instead, like a trained net.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from . import configs
from .parity.checkpoint import perturb_norms, reference_pipeline

# The zero-initialised layers of a ControlNet, by diffusers' module names.
ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")

# ControlNet config for each pipeline family of pare/parity/checkpoint.py (the tiny families' VAE has a factor 2).
FAMILY_CONTROLNETS = {"tiny": "tiny-sd-pipe", "tiny-sdxl": "tiny-sdxl-pipe", "sd15": "sd15", "sdxl": "sdxl"}


def randomize_zero_convs(model: nn.Module, seed: int) -> None:
    """Give the zero convolutions torch's default (seeded) init, so that the residuals are not all 0."""
    torch.manual_seed(seed + 1000)
    modules = dict(model.named_modules())
    for name in ZERO_CONVS:
        for module in modules[name].modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()


def reference_controlnet(reference: ModuleType, config: str | dict, seed: int = 0, device="cpu",
                         dtype=torch.float32) -> nn.Module:
    """diffusers' ControlNetModel at `config` (a dict or a key of CONTROLNET_CONFIGS): seeded random init,
    random norm affines and random zero convs, built on `device`, cast to `dtype`."""
    config = configs.CONTROLNET_CONFIGS[config] if isinstance(config, str) else config
    torch.manual_seed(seed)
    with torch.device(device):
        model = reference.ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    perturb_norms(model, seed)
    randomize_zero_convs(model, seed)
    return model.to(dtype).eval()


def make_controlnet_checkpoint(reference: ModuleType, folder: str | Path, config: str | dict, seed: int = 0,
                               device="cpu", dtype=torch.float32, variant: str | None = None) -> Path:
    """`reference_controlnet(...)` written to `folder` by diffusers' save_pretrained; returns the folder."""
    model = reference_controlnet(reference, config, seed, device, dtype)
    model.save_pretrained(folder, safe_serialization=True, variant=variant)
    return Path(folder)


def reference_controlnet_pipeline(reference: ModuleType, family: str, seed: int = 0, device="cpu",
                                  dtype=torch.float32, model_max_length: int = 77):
    """diffusers' (SDXL) ControlNet text-to-image pipeline for a family of pare/parity/checkpoint.py
    ("tiny", "tiny-sdxl", "sd15", "sdxl"): its pipeline's components plus a ControlNet seeded seed + 4."""
    pipe = reference_pipeline(reference, family, seed, device, dtype, model_max_length)
    controlnet = reference_controlnet(reference, FAMILY_CONTROLNETS[family], seed + 4, device, dtype)
    parts = dict(pipe.components, controlnet=controlnet)
    if "text_encoder_2" in parts:
        cls = reference.StableDiffusionXLControlNetPipeline
        parts = {k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                                       "controlnet", "scheduler")}
        return cls(**parts, add_watermarker=False)
    parts = {k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "scheduler")}
    return reference.StableDiffusionControlNetPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)


def pare_controlnet_twin(pipe, dtype: torch.dtype | None = None):
    """pare's ControlNet pipeline with the weights of diffusers' (SDXL) ControlNet pipeline `pipe`, no files
    written: `pare.parity.checkpoint.pare_twin` for the rest, the ControlNet(s) copied the same way."""
    import pare
    from .parity.checkpoint import pare_model_like, pare_twin

    base = pare_twin(pipe, dtype)
    nets = getattr(pipe.controlnet, "nets", None)
    controlnet = ([pare_model_like(pare.ControlNetModel, net, dtype) for net in nets] if nets is not None
                  else pare_model_like(pare.ControlNetModel, pipe.controlnet, dtype))
    xl = isinstance(base, pare.StableDiffusionXLPipeline)
    cls = pare.StableDiffusionXLControlNetPipeline if xl else pare.StableDiffusionControlNetPipeline
    return cls(**base.components, controlnet=controlnet)
