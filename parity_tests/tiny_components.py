"""One set of pipeline components for the pipeline and CLI tests, written to disk as diffusers lays it out.

Nothing can be downloaded here, so the test writes everything itself:

- a tiny byte-level CLIP tokenizer: the 256 byte symbols, each also with CLIP's end-of-word
  mark `</w>`, a few merges, and the two special tokens at the top of the vocabulary as in real
  CLIP (so that "the highest id is the end of text", which CLIP's pooling relies on, holds);
- CLIP text encoders at a seeded random init (`CLIPTextModel`, and `CLIPTextModelWithProjection`
  for SDXL's second encoder);
- the UNet and VAE from `pare/configs.py`, built by diffusers at a seeded random init with random
  norm affines (`checkpoints.build_diffusers_model`);

then assembles diffusers' own pipeline from them and calls its `save_pretrained`, so the folder
(model_index.json + unet/ vae/ scheduler/ text_encoder/ tokenizer/ [text_encoder_2/ tokenizer_2/])
is exactly what diffusers writes. Both libraries load that one folder.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from pare.configs import SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE, TINY_SD_UNET, TINY_SDXL_UNET, TINY_VAE

from .checkpoints import build_diffusers_model

# SD1.5's scheduler_config.json, made a DDIMScheduler (SD1.5 ships PNDMScheduler, which pare has not).
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

# Text encoders: tiny for the CPU tier; for the official tier, the official widths (768; 768 + 1280)
# with two layers, since only the UNet and VAE need their official configs there.
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
             "projection_dim": 32}
OFFICIAL_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 2,
                 "projection_dim": 768}
OFFICIAL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                   "num_hidden_layers": 2, "projection_dim": 1280}

FAMILIES = {
    # name: (unet config, vae config, text encoder config, second text encoder config or None)
    "tiny-sd": (TINY_SD_UNET, TINY_VAE, TINY_TEXT, None),
    "tiny-sdxl": (TINY_SDXL_UNET, TINY_VAE, TINY_TEXT, TINY_TEXT),
    "sd15": (SD15_UNET, SD_VAE, OFFICIAL_TEXT, None),
    "sdxl": (SDXL_UNET, SDXL_VAE, OFFICIAL_TEXT, OFFICIAL_TEXT_2),
}

_ROOT: Path | None = None
_FOLDERS: dict[str, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="pare-pipelines-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (byte-level BPE works on these characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars))


def tiny_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over single bytes plus a few merges (diffusers' save_pretrained writes its files)."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n")]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the highest ids, as in CLIP
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                         model_max_length=model_max_length)


def tiny_text_encoder(text: dict, vocab_size: int, max_positions: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**text, vocab_size=vocab_size, max_position_embeddings=max_positions,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def build_diffusers_pipeline(family: str, seed: int = 0, scheduler: dict | None = None, device="cpu",
                             model_max_length: int = 77):
    """diffusers' pipeline for `family` (a key of FAMILIES), every component seeded; float32 on `device`."""
    import diffusers

    unet_config, vae_config, text, text_2 = FAMILIES[family]
    tokenizer = tiny_tokenizer(model_max_length)
    vocab_size = len(tokenizer)
    sched = diffusers.DDIMScheduler.from_config(scheduler or SD_SCHEDULER)
    unet = build_diffusers_model("unet", unet_config, seed, device)
    vae = build_diffusers_model("vae", vae_config, seed + 1, device)
    text_encoder = tiny_text_encoder(text, vocab_size, model_max_length, seed + 2).to(device)
    if text_2 is None:
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    text_encoder_2 = tiny_text_encoder(text_2, vocab_size, model_max_length, seed + 3, projection=True).to(device)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=sched, add_watermarker=False,
    )


def pipeline_folder(family: str = "tiny-sd", seed: int = 0) -> Path:
    """A diffusers-format pipeline folder for `family`, written once per test session by diffusers."""
    key = f"{family}-{seed}"
    if key not in _FOLDERS:
        folder = _root() / key
        pipe = build_diffusers_pipeline(family, seed)
        pipe.save_pretrained(folder, safe_serialization=True)
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def copy_folder(family: str, dest: Path, drop: str | None = None) -> Path:
    """A copy of the family's folder, optionally without the component `drop` (its subfolder removed)."""
    shutil.copytree(pipeline_folder(family), dest)
    if drop is not None:
        shutil.rmtree(dest / drop)
    return dest
