"""Random-init pipelines at official configs, built by diffusers itself: no weights need downloading.

`pare parity` (without `--model`) and `pare bench` need the official SD1.5, SD2.1 and SDXL
architectures but cannot download their weights. So diffusers (the reference module handed
in, see `reference.py`) builds every model at its config with a seeded random init, and
`make_checkpoint` writes the whole pipeline with diffusers' own `save_pretrained`, in the
official layout (model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/, and
for SDXL text_encoder_2/, tokenizer_2/). pare then loads that folder as it would a Hub repo.

What is not official: the tokenizer. CLIP's BPE vocabulary (49408 tokens) cannot be
downloaded either, so `tiny_tokenizer` is a byte-level CLIP tokenizer (the 256 bytes, each
also with CLIP's end-of-word mark, a few merges, the two special tokens at the top), and each
text encoder's embedding table has that many rows. Every transformer layer has its official
shape; the table is only looked up, so compute and memory are as for the real model.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .. import configs

# name: (UNet, VAE, text encoder, second text encoder or None, the scheduler's prediction type)
FAMILIES = {
    "tiny": (configs.TINY_SD_UNET, configs.TINY_VAE, configs.TINY_TEXT, None, "epsilon"),
    "tiny-sdxl": (configs.TINY_SDXL_UNET, configs.TINY_VAE, configs.TINY_TEXT, configs.TINY_TEXT, "epsilon"),
    "sd15": (configs.SD15_UNET, configs.SD_VAE, configs.CLIP_L_TEXT, None, "epsilon"),
    "sd21": (configs.SD21_UNET, configs.SD21_VAE, configs.OPENCLIP_H_TEXT, None, "v_prediction"),
    "sdxl": (configs.SDXL_UNET, configs.SDXL_VAE, configs.CLIP_L_TEXT, configs.OPENCLIP_BIGG_TEXT, "epsilon"),
}

# The SD scheduler_config.json (scaled-linear betas, "leading" spacing), as a DDIMScheduler.
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1}


def perturb_norms(model: nn.Module, seed: int) -> None:
    """Give every norm layer a random affine (init leaves weight=1, bias=0, which hides affine bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (byte-level BPE works on these characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars))


def tiny_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over single bytes plus a few merges; the special tokens take the highest ids, as in CLIP
    (whose pooling picks the end-of-text token as the highest id)."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n")]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                         model_max_length=model_max_length)


def clip_text_encoder(text: dict, vocab_size: int, max_positions: int, seed: int, projection: bool = False,
                      device: str | torch.device = "cpu"):
    """transformers' CLIP text encoder at config `text`, seeded random init (with a projection: SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**text, vocab_size=vocab_size, max_position_embeddings=max_positions,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def reference_model(reference: ModuleType, cls_name: str, config: dict, seed: int, device, dtype) -> nn.Module:
    """diffusers' model at `config`: seeded random init with random norm affines, built on `device`
    (far faster than building an official config on a CPU), then cast to `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(reference, cls_name).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    perturb_norms(model, seed)
    return model.to(dtype).eval()


def reference_pipeline(reference: ModuleType, family: str, seed: int = 0, device="cpu", dtype=torch.float32,
                       model_max_length: int = 77):
    """diffusers' text-to-image pipeline for `family` (a key of FAMILIES), every model seeded, on `device` in `dtype`."""
    unet, vae, text, text_2, prediction_type = FAMILIES[family]
    return build_reference_pipeline(reference, (unet, vae, text, text_2), {**SCHEDULER, "prediction_type": prediction_type},
                                    seed, device, dtype, model_max_length)


def build_reference_pipeline(reference: ModuleType, models: tuple, scheduler: dict, seed: int = 0, device="cpu",
                             dtype=torch.float32, model_max_length: int = 77):
    """diffusers' SD pipeline (SDXL's when a second text encoder is given) from `models` = (UNet config, VAE
    config, text encoder config, second text encoder config or None) and a DDIM `scheduler` config.
    The UNet, VAE and encoders are seeded seed, seed + 1, seed + 2 and seed + 3."""
    unet, vae, text, text_2 = models
    tokenizer = tiny_tokenizer(model_max_length)
    encoder = lambda cfg, s, proj=False: clip_text_encoder(  # noqa: E731
        cfg, len(tokenizer), model_max_length, s, proj, device).to(dtype)
    parts = dict(
        unet=reference_model(reference, "UNet2DConditionModel", unet, seed, device, dtype),
        vae=reference_model(reference, "AutoencoderKL", vae, seed + 1, device, dtype),
        scheduler=reference.DDIMScheduler.from_config(scheduler),
        text_encoder=encoder(text, seed + 2), tokenizer=tokenizer,
    )
    if text_2 is None:
        return reference.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return reference.StableDiffusionXLPipeline(**parts, text_encoder_2=encoder(text_2, seed + 3, True),
                                               tokenizer_2=tokenizer, add_watermarker=False)


def make_checkpoint(reference: ModuleType, folder: Path, family: str, seed: int = 0, device="cpu",
                    dtype=torch.float32) -> Path:
    """`reference_pipeline(...)` written to `folder` by diffusers' save_pretrained; returns the folder."""
    pipe = reference_pipeline(reference, family, seed, device, dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_skipped_text_encoders(pipe, Path(folder))
    return Path(folder)


def write_skipped_text_encoders(pipe, folder: Path) -> None:
    """Write the text encoders transformers did not: once torch.distributed is initialized, its save_pretrained
    writes a model (config and weights) on rank 0 only (`should_save_on_this_rank`, transformers 5.x), but
    every `pare sweep` rank makes its own checkpoint. The same files it writes: config.json, model.safetensors."""
    from safetensors.torch import save_model

    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None or (folder / name / "model.safetensors").exists():
            continue
        model.config.save_pretrained(folder / name)
        save_model(model, str(folder / name / "model.safetensors"), metadata={"format": "pt"})


def pare_model_like(cls, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """pare's `cls` at diffusers' `model`'s config, holding its weights (strict state-dict load).

    Built on the meta device, then given the tensors themselves (`assign=True`): with `dtype`
    None the twins share storage; with a `dtype`, pare gets copies cast to it.
    """
    with torch.device("meta"):
        ours = cls.from_config(dict(model.config))
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype=dtype, copy=True) for k, v in state.items()}
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval()


def pare_twin(pipe, dtype: torch.dtype | None = None):
    """pare's pipeline with the weights of diffusers' `pipe`, no files written.

    With `dtype` None, pare's UNet and VAE hold diffusers' very tensors (`pare_model_like`) and
    the text encoders and tokenizers are shared (they are transformers' in both libraries): both
    libraries run on the same weights, held once. With a `dtype`, pare gets its own copies cast
    to it, text encoders included, so that casting one pipeline leaves the other as it is.
    The scheduler is rebuilt from its config.
    """
    import copy

    import pare
    from ..schedulers import get_scheduler_class

    parts = dict(pipe.components)
    parts["unet"] = pare_model_like(pare.UNet2DConditionModel, pipe.unet, dtype)
    parts["vae"] = pare_model_like(pare.AutoencoderKL, pipe.vae, dtype)
    parts["scheduler"] = get_scheduler_class(type(pipe.scheduler).__name__).from_config(dict(pipe.scheduler.config))
    if dtype is not None:
        for name in ("text_encoder", "text_encoder_2"):
            if parts.get(name) is not None:
                parts[name] = copy.deepcopy(parts[name]).to(dtype)
    cls = pare.StableDiffusionXLPipeline if parts.get("text_encoder_2") is not None else pare.StableDiffusionPipeline
    return cls(**{k: parts[k] for k in cls.component_kinds})
