"""Which model a single file holds: the families, how each is recognised, and what each file may carry besides.

diffusers twin: `loaders/single_file_utils.py` (`infer_diffusers_model_type`, `CHECKPOINT_KEY_NAMES`,
`DIFFUSERS_DEFAULT_PIPELINE_PATHS`). Family names are diffusers' model types.

Recognition reads the file's keys and shapes (`FamilyEvidence`), in this order:
1. where the text encoders sit: `conditioner.embedders.1.*` (SDXL base), OpenCLIP at
   `conditioner.embedders.0.model.*` (SDXL refiner), OpenCLIP at `cond_stage_model.model.*`
   (SD 2.x), OpenAI CLIP at `cond_stage_model.transformer.*` (SD 1.x);
2. a UNet-only file: its cross-attention (context) width, 768 / 1024 / 2048 / 1280, and for
   SDXL the input width of `label_emb` (2816 base, 2560 refiner);
3. `in_channels` (the input conv's second dim): 9 makes the family's inpainting variant.

SD 2.x files do not say whether they are the 512-px epsilon model or the 768-px v-prediction
one: like diffusers, pare takes the 768-v model (stabilityai/stable-diffusion-2-1); pass
`prediction_type="epsilon"` (or `config=` a 2-base folder) for the 512 base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import configs

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_PREFIXES = (VAE_PREFIX, "vae.")  # where a whole checkpoint keeps its VAE; a standalone VAE file has no prefix
IN_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"

# The SDXL refiner UNet (stabilityai/stable-diffusion-xl-refiner-1.0, unet/config.json).
SDXL_REFINER_UNET = {
    **configs.SDXL_UNET,
    "attention_head_dim": [6, 12, 12, 12],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560,  # 5 time ids (aesthetic score instead of the target size) x 256 + 1280
    "transformer_layers_per_block": 4,
}


@dataclass(frozen=True)
class TextEncoderSlot:
    component: str  # the pipeline's argument name
    prefix: str  # where the file keeps it
    format: str  # "openai" (transformers' own names) or "openclip"


OPENAI_SD = TextEncoderSlot("text_encoder", "cond_stage_model.transformer.", "openai")
OPENCLIP_SD2 = TextEncoderSlot("text_encoder", "cond_stage_model.model.", "openclip")
OPENAI_SDXL = TextEncoderSlot("text_encoder", "conditioner.embedders.0.transformer.", "openai")
OPENCLIP_SDXL = TextEncoderSlot("text_encoder_2", "conditioner.embedders.1.model.", "openclip")
OPENCLIP_REFINER = TextEncoderSlot("text_encoder_2", "conditioner.embedders.0.model.", "openclip")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    unet: dict
    vae: dict
    text_encoders: tuple[TextEncoderSlot, ...]
    default_repo: str  # where diffusers (and pare) read tokenizer and scheduler configs when no `config=` is given
    sdxl: bool = False


FAMILIES = {f.name: f for f in [
    Family("v1", "SD 1.x", configs.SD15_UNET, configs.SD_VAE, (OPENAI_SD,),
           "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    Family("inpainting", "SD 1.x inpainting", configs.SD15_INPAINT_UNET, configs.SD_VAE, (OPENAI_SD,),
           "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    Family("v2", "SD 2.x (768 px, v-prediction)", configs.SD21_UNET, configs.SD21_VAE, (OPENCLIP_SD2,),
           "stabilityai/stable-diffusion-2-1"),
    Family("inpainting_v2", "SD 2.x inpainting", {**configs.SD21_UNET, "in_channels": 9, "sample_size": 64},
           configs.SD_VAE, (OPENCLIP_SD2,), "stabilityai/stable-diffusion-2-inpainting"),
    Family("xl_base", "SDXL base", configs.SDXL_UNET, configs.SDXL_VAE, (OPENAI_SDXL, OPENCLIP_SDXL),
           "stabilityai/stable-diffusion-xl-base-1.0", sdxl=True),
    Family("xl_inpaint", "SDXL inpainting", {**configs.SDXL_UNET, "in_channels": 9}, configs.SDXL_VAE,
           (OPENAI_SDXL, OPENCLIP_SDXL), "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", sdxl=True),
    Family("xl_refiner", "SDXL refiner", SDXL_REFINER_UNET, configs.SDXL_VAE, (OPENCLIP_REFINER,),
           "stabilityai/stable-diffusion-xl-refiner-1.0", sdxl=True),
]}
INPAINTING = {"v1": "inpainting", "v2": "inpainting_v2", "xl_base": "xl_inpaint"}

# Step 1: the text encoders' place -> family. The first prefix present wins.
BY_TEXT_ENCODER = (
    ("conditioner.embedders.1.", "xl_base"),
    ("conditioner.embedders.0.model.", "xl_refiner"),
    ("cond_stage_model.model.", "v2"),
    ("cond_stage_model.transformer.", "v1"),
)
# Step 2, a UNet-only file: (context width, label_emb input width or None) -> family.
BY_UNET = {(768, None): "v1", (1024, None): "v2", (2048, 2816): "xl_base", (1280, 2560): "xl_refiner"}

# Keys a single file may carry that no pare model uses, each with the reason it is skipped.
IGNORED_KEYS = (
    (r"model_ema\..*", "the UNet's EMA copy (read instead of the main weights with extract_ema=True)"),
    (r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
     r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
     r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)",
     "LatentDiffusion's noise-schedule buffers: the scheduler computes them from its config"),
    (r"denoiser\.(sigmas|log_sigmas)", "sgm's noise schedule: the scheduler computes it"),
    (r"(cond_stage_model|conditioner\.embedders\.\d)\.transformer\.text_model\.embeddings\.position_ids",
     "CLIP's position ids, 0..76: a constant transformers rebuilds"),
    (r"(cond_stage_model|conditioner\.embedders\.\d)\.model\.(attn_mask|logit_scale)",
     "OpenCLIP's causal mask (CLIP builds its own) and its contrastive temperature (unused for text features)"),
    (r"first_stage_model\.loss\..*", "the VAE's training loss (LPIPS and discriminator)"),
)
_IGNORED = [re.compile(pattern) for pattern, _ in IGNORED_KEYS]


def is_ignored(key: str) -> bool:
    return any(p.fullmatch(key) for p in _IGNORED)


@dataclass(frozen=True)
class FamilyEvidence:
    """What the file says about its family: the facts recognition reads, kept for the error message."""

    in_channels: int | None
    context_dim: int | None
    label_emb_dim: int | None
    text_encoder_prefixes: tuple[str, ...]

    @classmethod
    def of(cls, state_dict: dict) -> "FamilyEvidence":
        in_conv = state_dict.get(IN_CONV)
        label = state_dict.get(LABEL_EMB)
        context = next((t.shape[1] for k, t in state_dict.items()
                        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
        prefixes = tuple(p for p, _ in BY_TEXT_ENCODER if any(k.startswith(p) for k in state_dict))
        return cls(in_conv.shape[1] if in_conv is not None and in_conv.ndim == 4 else None,
                   None if context is None else int(context), None if label is None else int(label.shape[1]),
                   prefixes)

    def __str__(self):
        return (f"in_channels={self.in_channels}, cross-attention width={self.context_dim}, "
                f"label_emb input width={self.label_emb_dim}, text encoders at {list(self.text_encoder_prefixes)}")


def detect_family(state_dict: dict, source: str) -> Family:
    """The family of an original-layout checkpoint, from its keys and shapes (steps 1-3 above)."""
    from .errors import SingleFileError

    evidence = FamilyEvidence.of(state_dict)
    if evidence.in_channels is None:
        top = sorted({k.split(".")[0] for k in state_dict})[:10]
        raise SingleFileError(f"{source} is not a Stable Diffusion checkpoint in the original layout: it has no "
                              f"UNet input conv {IN_CONV!r}; its keys start with {top}")
    base = next((family for prefix, family in BY_TEXT_ENCODER if prefix in evidence.text_encoder_prefixes), None)
    if base is None:
        base = BY_UNET.get((evidence.context_dim, evidence.label_emb_dim))
    if base is None:
        raise SingleFileError(
            f"{source} fits no known family ({', '.join(FAMILIES)}): {evidence}. Known UNet-only widths "
            f"(context, label_emb): {sorted(BY_UNET, key=str)}. Pass config= a diffusers folder or a family name for its architecture.")
    if evidence.in_channels == 9:
        if base not in INPAINTING:
            raise SingleFileError(f"{source}: a 9-channel (inpainting) UNet in a {FAMILIES[base].description} file "
                                  "fits no known family")
        return FAMILIES[INPAINTING[base]]
    if evidence.in_channels != 4:
        raise SingleFileError(f"{source}: the UNet takes {evidence.in_channels} input channels; SD families take 4, "
                              "or 9 for inpainting")
    return FAMILIES[base]
