"""Text-to-image with ControlNet, SD 1.x / 2.x and SDXL: the four steps, and one step added to denoise.

    1. encode_prompt
    2. get_latent
    3. denoise, each step:  control_residuals (ControlNet on the latents and the condition image)
                            -> UNet with the residuals added to its skips and mid block -> CFG -> scheduler
    4. vae_decode

diffusers twins: `pipelines/controlnet/pipeline_controlnet.py` (StableDiffusionControlNetPipeline)
and `pipeline_controlnet_sd_xl.py` (StableDiffusionXLControlNetPipeline).
Source: ControlNet, Zhang et al. (arXiv 2302.05543): section 3 (the residuals), section 4.3
(guess mode: the ControlNet sees only the conditional half of the CFG batch, its residuals
weighted 0.1 ... 1); `control_guidance_start` / `_end` run it on a fraction of the steps only.

Steps 1, 2 and 4 are the base pipelines' own: `__call__` prepares the condition image, sets the
control inputs for the call, and runs the base pipeline, whose `denoise` is replaced here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.controlnet import ControlNetModel
from ..models.multicontrolnet import MultiControlNetModel
from .image_inputs import preprocess_control_image
from .pipeline_utils import PipelineOutput, rescale_noise_cfg, step_callback
from .stable_diffusion import StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLPipeline


@dataclass
class ControlInputs:
    """What the ControlNet(s) get in one call: the condition image(s) (B, 3, H, W) in [0, 1], the scales, the window."""

    image: torch.Tensor | list[torch.Tensor]
    conditioning_scale: float | list[float]
    guess_mode: bool
    start: list[float]  # the fraction of the steps where each ControlNet starts ...
    end: list[float]  # ... and stops


class ControlNetMixin:
    """The ControlNet step of the sampling loop, and the control arguments of `__call__`."""

    def set_controlnet(self, controlnet):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
            raise TypeError(f"controlnet must be a ControlNetModel, a MultiControlNetModel or a list of "
                            f"ControlNetModels, not {type(controlnet).__name__}")
        self.controlnet = controlnet
        self._control = None

    @property
    def nets(self) -> list[ControlNetModel]:
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def prepare_control(self, image, height, width, controlnet_conditioning_scale, guess_mode,
                        control_guidance_start, control_guidance_end) -> ControlInputs:
        """Check the control arguments and preprocess the condition image(s), before any work is done."""
        if image is None:
            raise ValueError("a ControlNet pipeline needs a condition image: pass `image` (or `control_image`)")
        nets = self.nets
        multi = isinstance(self.controlnet, MultiControlNetModel)
        images = image if multi else [image]
        if multi and (not isinstance(image, list) or len(image) != len(nets)):
            raise ValueError(f"{len(nets)} ControlNets need a list of {len(nets)} condition images, "
                             f"got {type(image).__name__}")
        pixels = [preprocess_control_image(i, self.vae_scale_factor, height, width) for i in images]
        if any(p.shape[-2:] != pixels[0].shape[-2:] for p in pixels):
            raise ValueError(f"the condition images must share one size, got {[tuple(p.shape[-2:]) for p in pixels]}")

        start = control_guidance_start if isinstance(control_guidance_start, list) else None
        end = control_guidance_end if isinstance(control_guidance_end, list) else None
        count = len(start or end or nets)
        start = start or [control_guidance_start] * count
        end = end or [control_guidance_end] * count
        if len(start) != len(nets) or len(end) != len(nets):
            raise ValueError(f"control_guidance_start {start} and control_guidance_end {end} need one entry per "
                             f"ControlNet ({len(nets)})")
        for s, e in zip(start, end):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_guidance_start {s} and control_guidance_end {e} must satisfy "
                                 f"0 <= start < end <= 1 (fractions of the denoising steps)")
        scale = controlnet_conditioning_scale
        if multi:
            scale = scale if isinstance(scale, list) else [scale] * len(nets)
            if len(scale) != len(nets):
                raise ValueError(f"controlnet_conditioning_scale has {len(scale)} entries for {len(nets)} ControlNets")
        elif isinstance(scale, list):
            scale = scale[0]  # diffusers takes the first for a single ControlNet
        # Shuffle-style ControlNets (global_pool_conditions) run in guess mode, as in diffusers.
        guess_mode = guess_mode or bool(nets[0].config.global_pool_conditions)
        return ControlInputs(pixels if multi else pixels[0], scale, guess_mode, start, end)

    def step_scales(self, control: ControlInputs, step: int, num_steps: int):
        """The conditioning scale of each ControlNet at this step: 0 outside its [start, end] window."""
        keep = [0.0 if step / num_steps < s or (step + 1) / num_steps > e else 1.0
                for s, e in zip(control.start, control.end)]
        if isinstance(control.conditioning_scale, list):
            return [c * k for c, k in zip(control.conditioning_scale, keep)]
        return control.conditioning_scale * keep[0]

    def batched_control_image(self, image: torch.Tensor, images: int, do_cfg: bool, guess_mode: bool):
        """(b, 3, H, W) -> (images, 3, H, W) (each repeated in turn, as diffusers does), doubled for CFG
        unless in guess mode, in the ControlNet's dtype."""
        image = image.repeat_interleave(images // image.shape[0], dim=0).to(self.device, self.controlnet.dtype)
        return torch.cat([image] * 2) if do_cfg and not guess_mode else image

    def control_residuals(self, t, latents, model_input, prompt_embeds, added_cond_kwargs, image, scale,
                          guess_mode: bool, do_cfg: bool):
        """ControlNet's residuals for one step: (down residuals, mid residual), or (None, None) at scale 0.

        In guess mode with CFG only the conditional half of the batch goes through the ControlNet,
        and the unconditional half gets zero residuals (arXiv 2302.05543, section 4.3).
        """
        if all(s == 0 for s in (scale if isinstance(scale, list) else [scale])):
            return None, None  # outside control_guidance_start/end: diffusers adds residuals of exactly 0
        if guess_mode and do_cfg:
            model_input = self.scheduler.scale_model_input(latents, t)
            prompt_embeds = prompt_embeds.chunk(2)[1]  # (2B, ...) -> the text half (B, ...)
            if added_cond_kwargs is not None:
                added_cond_kwargs = {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()}
        down, mid = self.controlnet(model_input, t, prompt_embeds, image, scale, guess_mode=guess_mode,
                                    added_cond_kwargs=added_cond_kwargs)
        if guess_mode and do_cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]  # (B, ...) -> (2B, ...)
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def denoise(self, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
                callback_inputs=("latents",)):
        """Stable Diffusion's sampling loop with the ControlNet step before every UNet call."""
        control = self._control
        do_cfg = guidance_scale > 1.0
        images = [control.image] if torch.is_tensor(control.image) else control.image
        images = [self.batched_control_image(i, latents.shape[0], do_cfg, control.guess_mode) for i in images]
        image = images[0] if torch.is_tensor(control.image) else images
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents  # (B, 4, h, w) -> (2B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            down, mid = self.control_residuals(t, latents, model_input, prompt_embeds, added_cond_kwargs, image,
                                               self.step_scales(control, i, len(timesteps)), control.guess_mode,
                                               do_cfg)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                   added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid)
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            latents, prompt_embeds = step_callback(self, callback, i, t, latents, prompt_embeds, callback_inputs)
        return latents

    def run_with_control(self, base_call, prompt, image, control_image, height, width, controlnet_conditioning_scale,
                         guess_mode, control_guidance_start, control_guidance_end, kwargs) -> PipelineOutput:
        if image is not None and control_image is not None:
            raise ValueError("pass the condition image once: as `image` (diffusers' name) or as `control_image`")
        control = self.prepare_control(image if image is not None else control_image, height, width,
                                       controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                       control_guidance_end)
        first = control.image if torch.is_tensor(control.image) else control.image[0]
        height, width = first.shape[-2:]  # the condition image sets the size, as in diffusers
        self._control = control
        try:
            return base_call(self, prompt, height=height, width=width, **kwargs)
        finally:
            self._control = None


CONTROL_DOC = """
        image (or control_image): the condition image (edges, depth, pose...), PIL / numpy / torch in
            [0, 1]; with several ControlNets, a list of one image per net. It is resized to
            height x width if they are given, and otherwise sets the size (cut to a multiple of 8).
        controlnet_conditioning_scale: weight of the residuals (a list: one per ControlNet).
        guess_mode: the ControlNet sees only the prompt half of the CFG batch, residuals weighted
            0.1 ... 1 (arXiv 2302.05543, section 4.3); on for global-pooling ControlNets.
        control_guidance_start, control_guidance_end: the fraction of the steps in which each
            ControlNet runs (step i runs when start <= i/N and (i+1)/N <= end).
        Other arguments are the base pipeline's, passed through by name."""


class StableDiffusionControlNetPipeline(ControlNetMixin, StableDiffusionPipeline):
    """Text-to-image with SD 1.x / 2.x and one or more ControlNets (diffusers: StableDiffusionControlNetPipeline)."""

    component_kinds = {**StableDiffusionPipeline.component_kinds, "controlnet": "controlnet"}

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler)
        self.set_controlnet(controlnet)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, height: int | None = None,
                 width: int | None = None, controlnet_conditioning_scale: float | list[float] = 1.0,
                 guess_mode: bool = False, control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, control_image=None, **kwargs) -> PipelineOutput:
        return self.run_with_control(StableDiffusionPipeline.__call__, prompt, image, control_image, height, width,
                                     controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                     control_guidance_end, kwargs)

    __call__.__doc__ = "Generate images from text, guided by a condition image.\n" + CONTROL_DOC


class StableDiffusionXLControlNetPipeline(ControlNetMixin, StableDiffusionXLPipeline):
    """Text-to-image with SDXL and one or more ControlNets (diffusers: StableDiffusionXLControlNetPipeline)."""

    component_kinds = {**StableDiffusionXLPipeline.component_kinds, "controlnet": "controlnet"}

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         force_zeros_for_empty_prompt)
        self.set_controlnet(controlnet)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, height: int | None = None,
                 width: int | None = None, controlnet_conditioning_scale: float | list[float] = 1.0,
                 guess_mode: bool = False, control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, control_image=None, **kwargs) -> PipelineOutput:
        return self.run_with_control(StableDiffusionXLPipeline.__call__, prompt, image, control_image, height, width,
                                     controlnet_conditioning_scale, guess_mode, control_guidance_start,
                                     control_guidance_end, kwargs)

    __call__.__doc__ = "Generate images from text with SDXL, guided by a condition image.\n" + CONTROL_DOC
