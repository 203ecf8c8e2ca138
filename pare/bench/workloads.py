"""The benchmark workloads: each builds the pare model and its diffusers twin on identical weights.

A workload is a (pare model, diffusers model, call for pare, call for diffusers) quadruple; the
calls close over the same input tensors, so both libraries do exactly the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from .. import configs

# family -> (UNet config, VAE config, image side in pixels)
FAMILIES = {
    "sd15": (configs.SD15_UNET, configs.SD_VAE, 512),
    "sd21": (configs.SD21_UNET, configs.SD_VAE, 768),
    "sdxl": (configs.SDXL_UNET, configs.SDXL_VAE, 1024),
    "tiny": (configs.TINY_SD_UNET, configs.TINY_VAE, 64),
}
CASES = ("unet", "vae-decode", "vae-encode", "scheduler-step", "pipeline")  # the default run
EXTRA_CASES = ("controlnet-step",)  # on request: ControlNet + UNet, one CFG step (families with a published ControlNet)
TEXT_TOKENS = 77  # CLIP's context length: what every SD pipeline feeds the UNet
PIPELINE_STEPS = 50  # diffusers' default num_inference_steps
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Workload:
    name: str
    ours: torch.nn.Module | object
    theirs: torch.nn.Module | object
    call_ours: Callable
    call_theirs: Callable
    graphable: bool = True  # False: host-side logic (a scheduler step) that a CUDA graph or compile would not show
    runs: tuple[int, int] | None = None  # (warm-up, timed) runs, where the defaults would take too long
    stages: Callable[[object], dict[str, list[torch.nn.Module]]] | None = None  # modules per stage, to time each
    fast: bool = True  # False: nothing for pare's fast path to change (a scheduler step)


def _twins(ref: ModuleType, pare_cls, ref_cls_name: str, config: dict, device, dtype):
    """diffusers' model with a seeded random init, and pare's built on it with a strict state-dict copy."""
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        theirs = getattr(ref, ref_cls_name).from_config(clean).to(dtype).eval()
        ours = pare_cls.from_config(clean).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def unet(ref: ModuleType, family: str, batch: int, device, dtype) -> Workload:
    from ..models.unet_2d_condition import UNet2DConditionModel

    config = FAMILIES[family][0]
    ours, theirs = _twins(ref, UNet2DConditionModel, "UNet2DConditionModel", config, device, dtype)
    side = config["sample_size"]
    g = torch.Generator(device).manual_seed(0)
    sample = torch.randn(batch, config["in_channels"], side, side, generator=g, device=device, dtype=dtype)
    context = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=g, device=device, dtype=dtype)
    t = torch.tensor(981, device=device)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled, generator=g, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch, device=device,
                                          dtype=dtype)}
    return Workload(
        f"{family} unet b{batch}", ours, theirs,
        lambda m: m(sample, t, context, added_cond_kwargs=added),
        lambda m: m(sample, t, context, added_cond_kwargs=added, return_dict=False)[0],
    )


def vae(ref: ModuleType, family: str, direction: str, device, dtype) -> Workload:
    from ..models.autoencoder_kl import AutoencoderKL

    config, side = FAMILIES[family][1], FAMILIES[family][2]
    ours, theirs = _twins(ref, AutoencoderKL, "AutoencoderKL", config, device, dtype)
    g = torch.Generator(device).manual_seed(0)
    if direction == "decode":
        z = torch.randn(1, config["latent_channels"], side // 8, side // 8, generator=g, device=device, dtype=dtype)
        return Workload(f"{family} vae decode {side}px", ours, theirs,
                        lambda m: m.decode(z), lambda m: m.decode(z, return_dict=False)[0])
    x = torch.rand(1, config["in_channels"], side, side, generator=g, device=device, dtype=dtype) * 2 - 1
    return Workload(f"{family} vae encode {side}px", ours, theirs,
                    lambda m: m.encode(x).mean, lambda m: m.encode(x).latent_dist.mean)


def scheduler_step(ref: ModuleType, family: str, device, dtype) -> Workload:
    from ..schedulers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    ours, theirs = DDIMScheduler(**config), ref.DDIMScheduler(**config)
    for s in (ours, theirs):
        s.set_timesteps(50, device=device)
    side = FAMILIES[family][0]["sample_size"]
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 4, side, side, generator=g, device=device, dtype=dtype)
    eps = torch.randn(1, 4, side, side, generator=g, device=device, dtype=dtype)
    t_ours, t_theirs = ours.timesteps[10], theirs.timesteps[10]
    return Workload(f"{family} ddim step", ours, theirs,
                    lambda s: s.step(eps, t_ours, latents).prev_sample,
                    lambda s: s.step(eps, t_theirs, latents, return_dict=False)[0], graphable=False, fast=False)


def pipeline(ref: ModuleType, family: str, device, dtype, steps: int = PIPELINE_STEPS) -> Workload:
    """The full text-to-image call: prompt, `steps` (50) DDIM steps with CFG (UNet batch 2), VAE decode; one image.

    diffusers' pipeline is built at the family's official configs (random init; see
    `pare.parity.checkpoint`), and pare's twin runs on the very same weight tensors. Both start
    from the same noise tensor and return the image as a tensor (no PIL conversion timed).
    """
    from ..parity.checkpoint import pare_twin, reference_pipeline

    theirs = reference_pipeline(ref, family, 0, device, dtype)
    ours = pare_twin(theirs)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    side = ours.default_size()
    noise = torch.randn(ours.latent_shape(1, side, side), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    kwargs = dict(prompt=PROMPT, height=side, width=side, num_inference_steps=steps, guidance_scale=7.5,
                  latents=noise, output_type="pt")

    def stages(pipe) -> dict[str, list[torch.nn.Module]]:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        return {"text encoders": encoders, "unet": [pipe.unet], "vae decode": [pipe.vae.decoder]}

    call = lambda p: p(**kwargs).images  # noqa: E731
    cuda = torch.device(device).type == "cuda"
    return Workload(f"{family} txt2img {steps} steps {side}px", ours, theirs, call, call, graphable=False,
                    runs=(1, 5) if cuda else (1, 2), stages=stages)


def build(ref: ModuleType, family: str, case: str, device, dtype, batch: int = 2,
          steps: int = PIPELINE_STEPS) -> Workload:
    if case == "unet":
        return unet(ref, family, batch, device, dtype)
    if case in ("vae-decode", "vae-encode"):
        return vae(ref, family, case.split("-")[1], device, dtype)
    if case == "scheduler-step":
        return scheduler_step(ref, family, device, dtype)
    if case == "pipeline":
        return pipeline(ref, family, device, dtype, steps)
    if case == "controlnet-step":
        from ..parity.controlnet_checkpoint import controlnet_step

        ours, theirs, call_ours, call_theirs = controlnet_step(ref, family, batch, device, dtype)
        return Workload(f"{family} controlnet + unet b{batch}", ours, theirs, call_ours, call_theirs)
    raise ValueError(f"unknown benchmark case {case!r}; expected one of {CASES + EXTRA_CASES}")
