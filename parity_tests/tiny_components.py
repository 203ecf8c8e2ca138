"""One set of pipeline components for the pipeline and CLI tests, written to disk as diffusers lays it out.

Nothing can be downloaded here, so the test writes everything itself:

- a tiny byte-level CLIP tokenizer (`pare.parity.checkpoint.tiny_tokenizer`, which `pare parity`
  and `pare bench` use too);
- CLIP text encoders at a seeded random init (`CLIPTextModel`, and `CLIPTextModelWithProjection`
  for SDXL's second encoder);
- the UNet and VAE from `pare/configs.py`, built by diffusers at a seeded random init with random
  norm affines (`pare.parity.checkpoint.build_reference_pipeline`);

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

from pare.configs import SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE, TINY_SD_UNET, TINY_SDXL_UNET, TINY_TEXT, TINY_VAE
from pare.parity.checkpoint import build_reference_pipeline, pare_twin


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


def build_diffusers_pipeline(family: str, seed: int = 0, scheduler: dict | None = None, device="cpu",
                             model_max_length: int = 77):
    """diffusers' pipeline for `family` (a key of FAMILIES), every component seeded; float32 on `device`."""
    import diffusers

    return build_reference_pipeline(diffusers, FAMILIES[family], scheduler or SD_SCHEDULER, seed, device,
                                    model_max_length=model_max_length)


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


# --- both libraries, one seed ------------------------------------------------------------------


# The pipeline tests' own cases run with DDIM and DDPM (deterministic and stochastic steps);
# test_pipeline_schedulers.py runs every registered scheduler through the pipelines.
PIPELINE_CASE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")


def scheduler_cases(cases: dict, every_scheduler: tuple[str, ...]) -> list[tuple[str, str]]:
    """(case, scheduler) pairs: the cases named in `every_scheduler` with DDIM and DDPM, the rest with DDIM."""
    return [(case, scheduler) for case in cases for scheduler in PIPELINE_CASE_SCHEDULERS
            if case in every_scheduler or scheduler == "DDIMScheduler"]


def diffusers_clip_skip_shim(pipe) -> None:
    """Let diffusers 0.42.1's SD clip_skip run under transformers >= 5.6.

    diffusers reads `text_encoder.text_model.final_layer_norm`, but transformers 5.6 flattened
    CLIPTextModel (huggingface/transformers#46285), so `clip_skip` raises AttributeError there
    (huggingface/diffusers#14124). Aliasing `text_model` to the model itself (outside nn.Module's
    registry, so no module cycle) gives diffusers the layout it expects; it computes the same thing.
    """
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)


def generators(seed: int, count: int | None = None):
    """One CPU generator, or `count` of them seeded seed, seed + 1, ..."""
    if count is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def record_run(pipe, seed: int = 0, n_generators: int | None = None, **kwargs):
    """Run `pipe` with fresh generators; return the latents after every step (via the callback) and the images."""
    steps = []

    def record(pipe, step, timestep, tensors):
        steps.append(tensors["latents"].detach().clone())
        return {}

    out = pipe(generator=generators(seed, n_generators), callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    return steps, out.images


def to_uint8(images) -> "np.ndarray":
    """[0, 1] float images -> uint8, rounded as diffusers' and pare's PIL output rounds them."""
    import numpy as np

    return (np.asarray(images) * 255).round().astype(np.uint8)


# The discrete check downstream of the float comparison: uint8 images may differ by one level where
# a value sits on a rounding boundary, in at most this fraction of values, and never by more.
MAX_UINT8_OFF_BY_ONE = 0.01


def assert_same_images(ours, theirs, name: str) -> None:
    import numpy as np

    a, b = to_uint8(ours).astype(np.int16), to_uint8(theirs).astype(np.int16)
    assert a.shape == b.shape, f"{name}: pare's images {a.shape}, diffusers' {b.shape}"
    diff = np.abs(a - b)
    off = float((diff > 0).mean())
    assert diff.max() <= 1 and off <= MAX_UINT8_OFF_BY_ONE, (
        f"{name}: uint8 images differ by up to {diff.max()} levels in {off:.2%} of values "
        f"(allowed: 1 level in {MAX_UINT8_OFF_BY_ONE:.0%})")


def assert_same_run(pare_pipe, diffusers_pipe, name: str, **kwargs):
    """Same arguments and seeds to both pipelines: the same latents after every step, the same image.

    Latents and the float image go through `assert_parity` (scope end_to_end, float32: rel L2
    <= 1e-4); the uint8 images through `assert_same_images`. Returns pare's latents per step and images.
    """
    from pare.parity import assert_parity

    ours_steps, ours = record_run(pare_pipe, output_type="np", **kwargs)
    theirs_steps, theirs = record_run(diffusers_pipe, output_type="np", **kwargs)
    assert len(ours_steps) == len(theirs_steps), (
        f"{name}: pare ran {len(ours_steps)} steps, diffusers {len(theirs_steps)}")
    for i, (a, b) in enumerate(zip(ours_steps, theirs_steps)):
        assert_parity(f"{name}: latents after step {i}", a, b, scope="end_to_end")
    assert_parity(f"{name}: image", torch.from_numpy(ours), torch.from_numpy(theirs), scope="end_to_end")
    assert_same_images(ours, theirs, name)
    return ours_steps, ours


# --- GPU tier: official configs ------------------------------------------------------------------


def official_pipelines(family: str, device, dtype):
    """diffusers' pipeline for an official family and pare's twin with the same weights, on `device`.

    No folder is written (SDXL's UNet alone is 10 GB in float32): pare's models are built from the
    diffusers models' configs and state dicts (copied, `pare_twin`), so they carry the same seeded
    random init. diffusers' pipeline stays float32 (the caller casts it); pare's is cast to `dtype`.
    """
    theirs = build_diffusers_pipeline(family, device=device, model_max_length=16)
    theirs.set_progress_bar_config(disable=True)
    ours = pare_twin(theirs, dtype)
    ours.set_progress_bar_config(disable=True)
    from parity_tests.harness import FAST

    if FAST:
        ours.enable_fast()  # --fast: the fast path, its UNet from CUDA graphs on CUDA
    return ours, theirs


def assert_official_run(ours, theirs, dtype, height: int, width: int, **kwargs) -> list:
    """Both pipelines from one noise tensor; below float32 judged against diffusers run in float64.

    Returns the comparisons (printed, for the GPU-tier summary).
    """
    from pare.parity import assert_parity

    device = ours.device
    noise = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    kwargs.update(height=height, width=width, output_type="pt")

    ref_steps, ref_image = [None] * kwargs["num_inference_steps"], None
    if dtype in (torch.float16, torch.bfloat16):
        theirs.to(torch.float64)
        ref_steps, ref_image = record_run(theirs, latents=noise.to(device, torch.float64), **kwargs)
    theirs.to(dtype)
    their_steps, their_image = record_run(theirs, latents=noise.to(device, dtype), **kwargs)
    our_steps, our_image = record_run(ours, latents=noise.to(device, dtype), **kwargs)

    assert len(our_steps) == len(their_steps) == len(ref_steps)
    results = []
    for i, (a, b, r) in enumerate(zip(our_steps, their_steps, ref_steps)):
        results.append(assert_parity(f"latents after step {i}", a, b, r, dtype=dtype, scope="end_to_end"))
    results.append(assert_parity("image", our_image, their_image, ref_image, dtype=dtype, scope="end_to_end"))
    for result in results:
        print(result)
    return results
