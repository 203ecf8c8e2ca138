"""Official-format checkpoints made on the spot, since no weights can be downloaded here.

`make_checkpoint("unet", config)` builds the *diffusers* model at `config` with a seeded
random init, writes it with diffusers' own `save_pretrained` (`config.json` +
`diffusion_pytorch_model.safetensors`, optionally an `fp16` variant and shards), and returns
the folder. Folders are cached per test session, keyed by everything that shapes them.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from pare.parity.checkpoint import reference_model

_CACHE: dict[str, Path] = {}
_ROOT: Path | None = None


def diffusers_class(kind: str):
    import diffusers

    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind]


def build_diffusers_model(kind: str, config: dict, seed: int = 0, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """The diffusers model at `config`, seeded random init with random norm affines, built directly on `device`."""
    import diffusers

    return reference_model(diffusers, diffusers_class(kind).__name__, config, seed, device, dtype)


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="pare-checkpoints-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def make_checkpoint(kind: str, config: dict, *, seed: int = 0, variant: str | None = None,
                    max_shard_size: str | int | None = None, device: str | torch.device = "cpu") -> Path:
    """A folder laid out like an official model repo's `unet/` or `vae/`, written by diffusers.

    `variant="fp16"` adds `diffusion_pytorch_model.fp16.safetensors` (half-precision copies)
    beside the float32 weights, as the official repos have; `max_shard_size` shards the weights.
    """
    key = json.dumps([kind, config, seed, variant, max_shard_size], sort_keys=True, default=str)
    if key in _CACHE:
        return _CACHE[key]
    folder = _root() / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    model = build_diffusers_model(kind, config, seed, device)
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, safe_serialization=True, **shard)
    if variant is not None:
        model.to(torch.float16).save_pretrained(folder, variant=variant, safe_serialization=True, **shard)
    _CACHE[key] = folder
    return folder
