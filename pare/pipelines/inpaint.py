"""Inpainting, SD 1.x / 2.x and SDXL: repaint the masked part of an image, keep the rest.

    1. encode_prompt
    2. get_latent      noise (strength 1) or the image's latents noised to the first kept step (SDEdit)
       prepare_mask    the mask at latent size, and the latents of the image with the masked part blanked
    3. denoise         9-channel UNets (SD inpainting checkpoints) read [latents, mask, masked-image latents];
                       4-channel UNets (any text-to-image checkpoint) "blend": after each step the unmasked
                       part is replaced by the image's latents noised to the next step
    4. vae_decode

diffusers twins: `pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py`
(StableDiffusionInpaintPipeline) and `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_inpaint.py`
(StableDiffusionXLInpaintPipeline). Sources: the inpainting model of latent diffusion (Rombach
et al., arXiv 2112.10752, section 4.5 and appendix); the blend is RePaint's known-region step
(Lugmayr et al., arXiv 2201.09865, eq. 8, without its resampling); SDEdit for strength < 1
(Meng et al., arXiv 2108.01073).

The mask is white (1) where the image is repainted, black (0) where it is kept. Not here:
`padding_mask_crop` and SDXL's `denoising_start` / `denoising_end` (the refiner hand-over).
"""

from __future__ import annotations

import torch

from .image_inputs import image_tensor, preprocess_mask
from .pipeline_utils import (PipelineOutput, extra_step_kwargs, randn_tensor, rescale_noise_cfg, retrieve_timesteps,
                             step_callback)
from .stable_diffusion import Img2ImgMixin, StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLPipeline

UNET_CHANNELS = (4, 9)  # blend mode, and inpainting checkpoints (4 latents + 1 mask + 4 masked-image latents)


class InpaintMixin(Img2ImgMixin):
    """The inpainting steps, shared by SD and SDXL."""

    def check_inpaint_inputs(self, image, mask_image, strength: float, num_inference_steps: int, timesteps):
        if image is None or mask_image is None:
            raise ValueError("inpainting needs an `image` and a `mask_image` (white = repaint, black = keep)")
        if self.unet.config.in_channels not in UNET_CHANNELS:
            raise ValueError(f"an inpainting UNet has in_channels in {UNET_CHANNELS} (4: blend mode, 9: an "
                             f"inpainting checkpoint), this one has {self.unet.config.in_channels}")
        if not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}: 1 starts from pure noise")
        steps = len(timesteps) if timesteps is not None else num_inference_steps
        if int(steps * strength) < 1:
            raise ValueError(f"strength {strength} x {steps} steps leaves no denoising step: raise `strength` "
                             f"or `num_inference_steps`")

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.vae_scale_factor  # the latents are the VAE's, whatever the UNet's in_channels
        return batch_size, self.vae.config.latent_channels, height // s, width // s

    def encode_image(self, image: torch.Tensor, generator=None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents: one posterior sample per image, with generator i for image i.

        As diffusers' inpainting pipelines: the images are not tiled to the batch first (img2img's
        rule), and the latents are only multiplied by scaling_factor. SDXL's VAE (force_upcast)
        encodes in float32.
        """
        upcast = bool(self.vae.config.force_upcast) and isinstance(self, StableDiffusionXLPipeline)
        dtype = image.dtype
        pixels = image.float() if upcast else image
        if isinstance(generator, list):
            latents = torch.cat([self.vae.encode_safely(pixels[i : i + 1], upcast=upcast).sample(generator[i])
                                 for i in range(pixels.shape[0])])
        else:
            latents = self.vae.encode_safely(pixels, upcast=upcast).sample(generator)
        return latents.to(dtype) * self.vae.config.scaling_factor

    def get_latent(self, init_image, timestep, images: int, height: int, width: int, dtype, strength: float,
                   generator=None, latents=None):
        """-> (latents, noise, image latents or None). x_T ~ N(0, sigma^2 I) at strength 1, else x_t ~ q(x_t | x_0)
        (DDPM eq. 4) with x_0 the image's latents; the blend mode always needs the image's latents."""
        strength_max = strength == 1.0
        image_latents = None
        if self.unet.config.in_channels == 4 or (latents is None and not strength_max):
            image_latents = self.encode_image(init_image.to(self.device, dtype), generator)
            image_latents = image_latents.repeat(images // image_latents.shape[0], 1, 1, 1)  # tiled to the batch
        if latents is not None:
            noise = latents.to(self.device)
            return noise * self.scheduler.init_noise_sigma, noise, image_latents
        noise = randn_tensor(self.latent_shape(images, height, width), generator=generator, device=self.device,
                             dtype=dtype)
        if strength_max:
            return noise * self.scheduler.init_noise_sigma, noise, image_latents
        return self.scheduler.add_noise(image_latents, noise, timestep), noise, image_latents

    def prepare_mask(self, mask, init_image, images: int, height: int, width: int, dtype, do_cfg: bool,
                     generator=None, masked_image_latents=None):
        """-> (mask (B', 1, h, w), masked-image latents (B', 4, h, w)), B' = 2B with CFG.

        The masked image is the image with the repainted part set to 0 (mid-grey in [-1, 1]).
        Only 9-channel UNets read the masked-image latents; they are encoded for both, as in diffusers.
        """
        if masked_image_latents is None:
            masked = init_image * (mask < 0.5)  # (B, 3, H, W)
            masked_image_latents = self.encode_image(masked.to(self.device, dtype), generator)
        masked_image_latents = masked_image_latents.to(self.device, dtype)
        s = self.vae_scale_factor
        mask = torch.nn.functional.interpolate(mask, size=(height // s, width // s)).to(self.device, dtype)
        for name, tensor in (("mask_image", mask), ("image", masked_image_latents)):
            if images % tensor.shape[0]:
                raise ValueError(f"{tensor.shape[0]} {name}s cannot be spread over {images} outputs: pass one, or "
                                 f"as many as prompts x num_images_per_prompt")
        mask = mask.repeat(images // mask.shape[0], 1, 1, 1)
        masked_image_latents = masked_image_latents.repeat(images // masked_image_latents.shape[0], 1, 1, 1)
        if do_cfg:
            mask, masked_image_latents = torch.cat([mask] * 2), torch.cat([masked_image_latents] * 2)
        return mask, masked_image_latents

    def denoise(self, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
                callback_inputs=("latents",), inpaint: dict | None = None):
        """Stable Diffusion's sampling loop, the UNet reading the mask (9 channels) or the result blended (4)."""
        mask, masked_image_latents = inpaint["mask"], inpaint["masked_image_latents"]
        noise, image_latents = inpaint["noise"], inpaint["image_latents"]
        do_cfg = guidance_scale > 1.0
        nine = self.unet.config.in_channels == 9
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents  # (B, 4, h, w) -> (2B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            if nine:
                model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)  # (2B, 9, h, w)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                   added_cond_kwargs=added_cond_kwargs)
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            if not nine:
                latents = self.blend(latents, image_latents, noise, mask.chunk(2)[0] if do_cfg else mask,
                                     timesteps, i)
            latents, prompt_embeds = step_callback(self, callback, i, t, latents, prompt_embeds, callback_inputs)
        return latents

    def blend(self, latents, image_latents, noise, mask, timesteps, i: int) -> torch.Tensor:
        """Keep the known region (mask 0): the image's latents, noised to the next step's level (clean after the
        last step)."""
        known = image_latents
        if i < len(timesteps) - 1:
            known = self.scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
        return (1 - mask) * known + mask * latents

    def prepare_inpaint_images(self, image, mask_image, height: int, width: int):
        """The image in [-1, 1] and the 0/1 mask, both resized to height x width."""
        init_image = 2.0 * image_tensor(image, self.vae_scale_factor, height, width) - 1.0  # [0, 1] -> [-1, 1]
        mask = preprocess_mask(mask_image, self.vae_scale_factor, height, width)
        return init_image, mask


class StableDiffusionInpaintPipeline(InpaintMixin, StableDiffusionPipeline):
    """Inpainting with SD 1.x / 2.x: 9-channel inpainting UNets, or any UNet in blend mode
    (diffusers: StableDiffusionInpaintPipeline)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint the white part of `mask_image` in `image` (PIL / numpy / torch in [0, 1]) following the prompt.

        Both are resized to height x width (default: the UNet's size). strength: 1 starts from pure
        noise; below 1 from the image noised to that fraction of the schedule. masked_image_latents:
        precomputed latents of the masked image. Other arguments as in StableDiffusionPipeline.__call__.
        """
        height = height or self.default_size()
        width = width or self.default_size()
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, height, width, latents,
        )
        self.check_inpaint_inputs(image, mask_image, strength, num_inference_steps, timesteps)
        images = batch_size * num_images_per_prompt
        do_cfg = guidance_scale > 1.0

        # 1. encode_prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, T, D)

        # 2. get_latent and prepare_mask
        _, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        init_image, mask = self.prepare_inpaint_images(image, mask_image, height, width)
        latents, noise, image_latents = self.get_latent(init_image, timesteps[:1].repeat(images), images, height,
                                                        width, prompt_embeds.dtype, strength, generator, latents)
        mask, masked_image_latents = self.prepare_mask(mask, init_image, images, height, width, prompt_embeds.dtype,
                                                       do_cfg, generator, masked_image_latents)

        # 3. denoise
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, 0.0, extra_step_kwargs(self.scheduler, generator, eta),
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
            inpaint=dict(mask=mask, masked_image_latents=masked_image_latents, noise=noise,
                         image_latents=image_latents),
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))


class StableDiffusionXLInpaintPipeline(InpaintMixin, StableDiffusionXLPipeline):
    """Inpainting with SDXL, 9-channel inpainting UNets or blend mode (diffusers: StableDiffusionXLInpaintPipeline)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> PipelineOutput:
        """Repaint the white part of `mask_image` in `image` with SDXL. diffusers' defaults: strength 0.9999,
        guidance 7.5. Arguments as in StableDiffusionInpaintPipeline.__call__ and StableDiffusionXLPipeline.__call__."""
        height = height or self.default_size()
        width = width or self.default_size()
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, height, width, latents,
        )
        self.check_sdxl_inputs(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                               pooled_prompt_embeds, negative_pooled_prompt_embeds, batch_size)
        self.check_inpaint_inputs(image, mask_image, strength, num_inference_steps, timesteps)
        images = batch_size * num_images_per_prompt
        do_cfg = guidance_scale > 1.0

        # 1. encode_prompt
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
        )

        # 2. get_latent and prepare_mask
        _, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        init_image, mask = self.prepare_inpaint_images(image, mask_image, height, width)
        latents, noise, image_latents = self.get_latent(init_image, timesteps[:1].repeat(images), images, height,
                                                        width, prompt_embeds.dtype, strength, generator, latents)
        mask, masked_image_latents = self.prepare_mask(mask, init_image, images, height, width, prompt_embeds.dtype,
                                                       do_cfg, generator, masked_image_latents)

        # SDXL's micro-conditioning; as in diffusers' inpainting, the negative ids take the positive crop.
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        add_time_ids = self.get_add_time_ids(original_size, crops_coords_top_left, target_size,
                                             prompt_embeds.dtype).repeat(images, 1)  # (B, 6)
        if do_cfg:
            negative_add_time_ids = self.get_add_time_ids(
                negative_original_size or original_size, crops_coords_top_left, negative_target_size or target_size,
                prompt_embeds.dtype).repeat(images, 1)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, 77, 2048)
            pooled = torch.cat([negative_pooled, pooled])  # (2B, 1280)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])  # (2B, 6)
        added_cond_kwargs = {"text_embeds": pooled.to(self.device), "time_ids": add_time_ids.to(self.device)}

        # 3. denoise
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
            extra_step_kwargs(self.scheduler, generator, eta), added_cond_kwargs,
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
            inpaint=dict(mask=mask, masked_image_latents=masked_image_latents, noise=noise,
                         image_latents=image_latents),
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))
