"""The SD2 x4 upscaler: a low-resolution image in, four times the pixels out, in the four steps.

    1. encode_prompt
    2. get_latent      noise at the low-res image's size; the image itself is noised to `noise_level`
                       by the low-res scheduler (noise augmentation) and concatenated to the latents
    3. denoise         the UNet reads [latents (4), noised image (3)] and the noise level as a class label
    4. vae_decode      the upscaler's VAE has 3 levels: latents -> 4x their size

diffusers twin: `pipelines/stable_diffusion/pipeline_stable_diffusion_upscale.py`
(StableDiffusionUpscalePipeline). Sources: latent diffusion's super-resolution model (Rombach
et al., arXiv 2112.10752, section 4.4), with the noise-conditioning augmentation of cascaded
diffusion (Ho et al., arXiv 2106.15282, section 4.1): the condition image is noised, and the
model is told how much.
"""

from __future__ import annotations

import torch

from .image_inputs import image_tensor
from .pipeline_utils import PipelineOutput, extra_step_kwargs, postprocess_image, randn_tensor, step_callback
from .stable_diffusion import StableDiffusionPipeline

X4_SCALING_FACTOR = 0.08333


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """4x super-resolution with stabilityai/stable-diffusion-x4-upscaler (diffusers: StableDiffusionUpscalePipeline).

    encode_prompt is Stable Diffusion's; get_latent, denoise and vae_decode are the upscaler's.
    """

    component_kinds = {**StableDiffusionPipeline.component_kinds, "low_res_scheduler": "scheduler"}
    options = ("max_noise_level",)

    def __init__(self, vae, text_encoder, tokenizer, unet, low_res_scheduler, scheduler, max_noise_level: int = 350):
        if vae.config.scaling_factor != X4_SCALING_FACTOR:
            # diffusers overwrites such a config with a deprecation warning; pare asks for the fix.
            raise ValueError(f"the x4 upscaler's VAE scales latents by {X4_SCALING_FACTOR}, but this VAE's config "
                             f"says scaling_factor={vae.config.scaling_factor}: set it to {X4_SCALING_FACTOR} "
                             f"in vae/config.json")
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is None:
            raise ValueError("the x4 upscaler's UNet embeds the noise level as a class label (num_class_embeds "
                             "set, class_embed_type None); this UNet has no such embedding")
        hidden = text_encoder.config.hidden_size
        if hidden != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoder's hidden size ({hidden}) must equal the UNet's cross_attention_dim "
                             f"({unet.config.cross_attention_dim})")
        # No legacy scheduler fix here: diffusers' upscale pipeline does not make one.
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.scheduler, self.low_res_scheduler = scheduler, low_res_scheduler
        self.max_noise_level = max_noise_level
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 4 for the upscaler's VAE

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> PipelineOutput:
        """Upscale `image` (PIL / numpy / torch in [0, 1]) 4x, following the prompt. Arguments, defaults: diffusers'.

        noise_level: how much the low-res image is noised before the UNet sees it (0 ... max_noise_level,
        default 20); more lets the model invent more detail. Other arguments as in StableDiffusionPipeline.
        """
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, None,
        )
        if image is None:
            raise ValueError("the upscaler needs the low-resolution `image`")
        if not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"`noise_level` must be in [0, max_noise_level = {self.max_noise_level}], "
                             f"got {noise_level}")
        do_cfg = guidance_scale > 1.0

        # 1. encode_prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, T, D)

        # 2. get_latent: the noised condition image first (its noise is drawn first), then the latents
        pixels = 2.0 * image_tensor(image, self.vae_scale_factor, resample="bicubic") - 1.0  # [0, 1] -> [-1, 1]
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        image, noise_level = self.noise_image(pixels.to(self.device, prompt_embeds.dtype), noise_level,
                                              num_images_per_prompt * (2 if do_cfg else 1), generator)
        images = batch_size * num_images_per_prompt
        if latents is not None and tuple(latents.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(f"`latents` {tuple(latents.shape)} must have the low-res image's size "
                             f"{tuple(image.shape[-2:])}")
        latents = self.get_latent(images, *(side * self.vae_scale_factor for side in image.shape[-2:]),
                                  prompt_embeds.dtype, generator, latents)

        # 3. denoise
        latents = self.denoise(latents, self.scheduler.timesteps, prompt_embeds, guidance_scale, image, noise_level,
                               extra_step_kwargs(self.scheduler, generator, eta), callback_on_step_end,
                               callback_on_step_end_tensor_inputs)

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.vae_scale_factor  # the latents are the VAE's 4 channels; the UNet's other 3 are the image
        return batch_size, self.vae.config.latent_channels, height // s, width // s

    def noise_image(self, image: torch.Tensor, noise_level: int, copies: int, generator=None):
        """x_low -> q(x_s | x_low) at s = noise_level (DDPM eq. 4, the low-res scheduler), tiled `copies` times
        (CFG halves and images per prompt, as diffusers tiles it); and the noise level as a (B',) class label."""
        if isinstance(generator, list):
            generator = generator[: image.shape[0]]  # diffusers draws one sample per image, with generator i
        noise = randn_tensor(image.shape, generator=generator, device=self.device, dtype=image.dtype)
        level = torch.tensor([noise_level], dtype=torch.long, device=self.device)
        image = self.low_res_scheduler.add_noise(image, noise, level)
        image = torch.cat([image] * copies)  # (b * copies, 3, h, w)
        return image, torch.cat([level] * image.shape[0])  # (b * copies,)

    def denoise(self, latents, timesteps, prompt_embeds, guidance_scale: float, image, noise_level,
                step_kwargs: dict | None = None, callback=None, callback_inputs=("latents",)):
        """The sampling loop, the UNet reading [latents, noised image] and the noise level (class_labels)."""
        do_cfg = guidance_scale > 1.0
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents  # (B, 4, h, w) -> (2B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image], dim=1)  # (2B, 7, h, w)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, class_labels=noise_level)
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            latents, prompt_embeds = step_callback(self, callback, i, t, latents, prompt_embeds, callback_inputs)
        return latents

    def vae_decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> 4x images; a float16 VAE whose config says force_upcast decodes in float32, as in diffusers."""
        if output_type == "latent":
            return latents
        upcast = self.vae.needs_upcast
        latents = latents.to(torch.float32 if upcast else self.vae.dtype)
        image = self.vae.decode_safely(self.vae.unscale_latents(latents), upcast=upcast)
        return postprocess_image(image, output_type)

