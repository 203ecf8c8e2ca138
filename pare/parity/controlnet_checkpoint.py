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

from .. import configs
from .checkpoint import perturb_norms, reference_pipeline

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
    from .checkpoint import pare_model_like, pare_twin

    base = pare_twin(pipe, dtype)
    nets = getattr(pipe.controlnet, "nets", None)
    controlnet = ([pare_model_like(pare.ControlNetModel, net, dtype) for net in nets] if nets is not None
                  else pare_model_like(pare.ControlNetModel, pipe.controlnet, dtype))
    xl = isinstance(base, pare.StableDiffusionXLPipeline)
    cls = pare.StableDiffusionXLControlNetPipeline if xl else pare.StableDiffusionControlNetPipeline
    return cls(**base.components, controlnet=controlnet)


# --- for `pare parity --components controlnet` and `pare bench` ---------------------------------------


def controlnet_inputs(config: str | dict, batch: int = 2, side: int | None = None, seed: int = 0, device="cpu",
                      dtype=torch.float32, tokens: int = 77) -> tuple[tuple, dict]:
    """(args, kwargs) of one ControlNet call at `config`: latents (B, 4, side, side), t, text (B, tokens, D),
    a condition image 2^(stages-1) times the latents' size in [0, 1], and SDXL's added_cond_kwargs.
    `side` defaults to the config's UNet's native latent size (64 for SD1.5, 128 for SDXL)."""
    config = configs.CONTROLNET_CONFIGS[config] if isinstance(config, str) else config
    sdxl = config.get("addition_embed_type") == "text_time"
    side = side or (128 if sdxl else 64)
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    g = torch.Generator(device).manual_seed(seed)
    args = (torch.randn(batch, config["in_channels"], side, side, generator=g, device=device).to(dtype),
            torch.tensor(500, device=device),
            torch.randn(batch, tokens, config["cross_attention_dim"], generator=g, device=device).to(dtype),
            torch.rand(batch, config.get("conditioning_channels", 3), factor * side, factor * side, generator=g,
                       device=device).to(dtype))
    kwargs = {}
    if sdxl:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = 8 * side
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g, device=device).to(dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)}
    return args, kwargs


def controlnet_rows(reference: ModuleType, config: str, device="cpu", dtype=torch.float32, seed: int = 0,
                    with64: bool = False, side: int | None = None, depth: str = "blocks", fast: bool = False):
    """Block-by-block rows (`pare.parity.blocks.compare_blocks`) of pare's ControlNet against diffusers' at a
    config of CONTROLNET_CONFIGS ("sd15", "sdxl", "tiny-sd", ...), on one seeded call; float64 reference if with64.
    pare's model is loaded from the checkpoint folder diffusers wrote, as a user would load it."""
    import copy
    import tempfile

    from ..models.controlnet import ControlNetModel
    from .blocks import compare_blocks

    theirs = reference_controlnet(reference, config, seed, device, dtype)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder, safe_serialization=True)
        ours = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, device=device)
    if fast:
        from ..fast import optimize_model

        optimize_model(ours)
    args, kwargs = controlnet_inputs(config, 2, side, seed, device, dtype)
    kwargs["return_dict"] = False  # both return (down residuals, mid residual)
    ref64 = copy.deepcopy(theirs).to(torch.float64) if with64 else None
    return compare_blocks(ours, theirs, args, kwargs, reference64=ref64, depth=depth).rows


def controlnet_step(reference: ModuleType, family: str, batch: int = 2, device="cpu", dtype=torch.float32):
    """One denoising step with a ControlNet, for `pare bench`: (ours, theirs, call_ours, call_theirs).

    `family` is "sd15", "sdxl", "tiny" or "tiny-sdxl"; ours and theirs are (UNet, ControlNet) pairs with the same
    seeded weights; a call runs the ControlNet and then the UNet with its residuals, returning the UNet's output.
    """
    from ..models.controlnet import ControlNetModel
    from ..models.unet_2d_condition import UNet2DConditionModel
    from .checkpoint import FAMILIES, pare_model_like

    unet_config = FAMILIES[family][0]
    name = FAMILY_CONTROLNETS[family]
    with torch.device(device):
        torch.manual_seed(0)
        their_unet = reference.UNet2DConditionModel.from_config(
            {k: v for k, v in unet_config.items() if not k.startswith("_")}).to(dtype).eval()
    their_net = reference_controlnet(reference, name, 0, device, dtype)
    ours = (pare_model_like(UNet2DConditionModel, their_unet), pare_model_like(ControlNetModel, their_net))
    args, kwargs = controlnet_inputs(name, batch, unet_config["sample_size"], 0, device, dtype)

    def call(pair, diffusers_side: bool):
        unet, net = pair
        extra = {"return_dict": False} if diffusers_side else {}
        down, mid = net(*args, **kwargs, **extra)[:2]
        out = unet(*args[:3], **kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   **extra)
        return out[0] if diffusers_side else out

    return ours, (their_unet, their_net), lambda pair: call(pair, False), lambda pair: call(pair, True)
