"""Stable Diffusion XL, text-to-image and image-to-image: the same four steps, with SDXL's conditioning.

What SDXL adds (Podell et al., "SDXL", arXiv 2307.01952):

- two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), whose penultimate hidden states are
  concatenated along features: (B, 77, 768) + (B, 77, 1280) -> (B, 77, 2048) (section 2.1);
- the second encoder's pooled, projected embedding, (B, 1280), added to the timestep embedding;
- micro-conditioning on `original_size`, `crops_coords_top_left` and `target_size`, six numbers
  (`add_time_ids`) that are Fourier-embedded and added the same way (sections 2.2 and 2.3);
- a VAE that overflows in float16, so it decodes in float32 (`force_upcast`).

diffusers twins: `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`
(StableDiffusionXLPipeline) and `pipeline_stable_diffusion_xl_img2img.py`
(StableDiffusionXLImg2ImgPipeline). The SDXL refiner (one text encoder, aesthetic score) is not
supported yet.
"""

from __future__ import annotations

import torch

from ..validation import check_call_arguments
from .pipeline_utils import PipelineOutput, extra_step_kwargs, postprocess_image, retrieve_timesteps
from .stable_diffusion import Img2ImgMixin, StableDiffusionPipeline, tokenize


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """Text-to-image with SDXL (diffusers: StableDiffusionXLPipeline; arXiv 2307.01952).

    Steps 2 and 3 (get_latent, denoise) are Stable Diffusion's; encode_prompt and vae_decode are SDXL's.
    """

    component_kinds = {"vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                       "tokenizer": "tokenizer", "tokenizer_2": "tokenizer", "unet": "unet", "scheduler": "scheduler"}
    options = ("force_zeros_for_empty_prompt",)

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 force_zeros_for_empty_prompt: bool = True):
        config = unet.config
        if getattr(config, "addition_embed_type", None) != "text_time":
            raise ValueError("this UNet takes no SDXL conditioning (addition_embed_type is not 'text_time'): "
                             "use StableDiffusionPipeline")
        hidden = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if hidden != config.cross_attention_dim:
            raise ValueError(f"the text encoders' hidden sizes add up to {hidden}, but the UNet's "
                             f"cross_attention_dim is {config.cross_attention_dim}")
        added = 6 * config.addition_time_embed_dim + text_encoder_2.config.projection_dim
        if added != config.projection_class_embeddings_input_dim:
            raise ValueError(f"6 time ids x addition_time_embed_dim ({config.addition_time_embed_dim}) + the pooled "
                             f"text embedding ({text_encoder_2.config.projection_dim}) = {added}, but the UNet's "
                             f"projection_class_embeddings_input_dim is {config.projection_class_embeddings_input_dim}")
        self.vae, self.unet, self.scheduler = vae, unet, scheduler  # SDXL's pipelines leave the scheduler as is
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        # With no negative prompt, SDXL's unconditional embeddings are zeros, not the encoded "".
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
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
        """Generate images from text with SDXL. Arguments, names and defaults are diffusers'.

        prompt_2 / negative_prompt_2 go to the second encoder (default: the same as prompt).
        original_size, crops_coords_top_left, target_size: micro-conditioning (arXiv 2307.01952
        sections 2.2-2.3), default (height, width), (0, 0), (height, width). The negative_* ones
        condition the unconditional half of CFG; they apply only when both sizes are given.
        Other arguments as in StableDiffusionPipeline.__call__.
        """
        check_call_arguments(self, locals())  # numbers, embeddings, images: before any model runs
        height = height or self.default_size()
        width = width or self.default_size()
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, height, width, latents,
            sigmas=sigmas,
        )
        self.check_sdxl_inputs(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                               pooled_prompt_embeds, negative_pooled_prompt_embeds, batch_size)
        images = batch_size * num_images_per_prompt
        do_cfg = self.uses_cfg(guidance_scale)

        # 1. encode_prompt: both encoders, plus the pooled embedding and the six micro-conditioning numbers.
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
        )
        add_time_ids = self.get_add_time_ids(original_size or (height, width), crops_coords_top_left,
                                             target_size or (height, width), prompt_embeds.dtype)
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self.get_add_time_ids(negative_original_size, negative_crops_coords_top_left,
                                                          negative_target_size, prompt_embeds.dtype)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, 77, 2048)
            pooled = torch.cat([negative_pooled, pooled])  # (2B, 1280)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])  # (2, 6)
        # Tiled as diffusers tiles them: rows alternate (negative, positive) while the embeddings hold
        # all negatives first. They agree unless the negative_* sizes are given for a batch of more than one.
        add_time_ids = add_time_ids.to(self.device).repeat(images, 1)  # (2B, 6), or (B, 6) without CFG
        added_cond_kwargs = {"text_embeds": pooled.to(self.device), "time_ids": add_time_ids}

        # 2. get_latent
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps, sigmas)
        latents = self.get_latent(images, height, width, prompt_embeds.dtype, generator, latents)

        # 3. denoise
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
            extra_step_kwargs(self.scheduler, generator, eta), added_cond_kwargs,
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))

    # --- SDXL's versions of steps 1 and 4 --------------------------------------------------

    def encode_prompt(self, prompt, prompt_2, num_images_per_prompt: int, do_cfg: bool, negative_prompt=None,
                      negative_prompt_2=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip: int | None = None):
        """-> prompt_embeds (B*n, 77, D1+D2), negative_prompt_embeds, pooled (B*n, P), negative_pooled.

        Hidden states are the penultimate layer's, without the final LayerNorm (clip_skip counts
        further down from there); the pooled embedding is the second encoder's projected text_embeds.
        """
        device, n = self.device, num_images_per_prompt
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            prompts_2 = prompt_2 or prompt
            prompts_2 = [prompts_2] if isinstance(prompts_2, str) else prompts_2
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            prompt_embeds, pooled = self.clip_hidden_states_xl(prompts, prompts_2, layer)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        batch_size = prompt_embeds.shape[0]

        if do_cfg and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negative_prompt = negative_prompt or ""
                negative_prompt_2 = negative_prompt_2 or negative_prompt
                negatives, negatives_2 = ([text] * batch_size if isinstance(text, str) else text
                                          for text in (negative_prompt, negative_prompt_2))
                # diffusers encodes the negative prompts from the penultimate layer whatever clip_skip says;
                # pare keeps that for parity.
                negative_prompt_embeds, negative_pooled_prompt_embeds = self.clip_hidden_states_xl(
                    negatives, negatives_2, -2, max_length=prompt_embeds.shape[1])

        dtype = self.text_encoder_2.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(n, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(n, dim=0)
        if not do_cfg:
            return prompt_embeds, None, pooled_prompt_embeds, None
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(n, dim=0)
        negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.repeat_interleave(n, dim=0)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def clip_hidden_states_xl(self, texts, texts_2, layer: int, max_length: int | None = None):
        """Both encoders' hidden states at `layer`, concatenated: (B, T, D1 + D2); and encoder 2's pooled (B, P)."""
        out = self.text_encoder(tokenize(self.tokenizer, texts, max_length).to(self.device), output_hidden_states=True)
        out_2 = self.text_encoder_2(tokenize(self.tokenizer_2, texts_2, max_length).to(self.device),
                                    output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[layer], out_2.hidden_states[layer]], dim=-1)  # (B, T, D1 + D2)
        return hidden, out_2.text_embeds

    def get_add_time_ids(self, original_size, crops_coords_top_left, target_size, dtype) -> torch.Tensor:
        """SDXL micro-conditioning (arXiv 2307.01952 sections 2.2, 2.3): (h_orig, w_orig, top, left,
        h_target, w_target) as a (1, 6) tensor; the UNet embeds each number like a timestep."""
        return torch.tensor([[*original_size, *crops_coords_top_left, *target_size]], dtype=dtype)

    def vae_decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """As Stable Diffusion's, but a float16 VAE whose config says force_upcast (SDXL's overflows
        in float16) decodes in float32, the latents unscaled in float32 first, as diffusers does."""
        if output_type == "latent":
            return latents
        upcast = self.vae.needs_upcast
        latents = latents.to(torch.float32 if upcast else self.vae.dtype)
        image = self.vae.decode_safely(self.vae.unscale_latents(latents), upcast=upcast)
        return postprocess_image(image, output_type)

    def check_sdxl_inputs(self, prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                          pooled_prompt_embeds, negative_pooled_prompt_embeds, batch_size: int):
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass at most one of `prompt_2` and `prompt_embeds`")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt_2` and `negative_prompt_embeds`")
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if isinstance(value, list) and len(value) != batch_size:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {batch_size} prompts")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("with `prompt_embeds`, pass `pooled_prompt_embeds` too (text_encoder_2's text_embeds)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("with `negative_prompt_embeds`, pass `negative_pooled_prompt_embeds` too")


class StableDiffusionXLImg2ImgPipeline(Img2ImgMixin, StableDiffusionXLPipeline):
    """Image-to-image with SDXL (diffusers: StableDiffusionXLImg2ImgPipeline; SDEdit, arXiv 2108.01073)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        """Redraw `image` with SDXL. Sizes default to the image's (after cutting to a multiple of 8).

        Arguments as in StableDiffusionXLPipeline.__call__ and StableDiffusionImg2ImgPipeline.__call__.
        """
        check_call_arguments(self, locals())  # numbers, embeddings, images: before any model runs
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, sigmas=sigmas,
        )
        self.check_sdxl_inputs(prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                               pooled_prompt_embeds, negative_pooled_prompt_embeds, batch_size)
        images = batch_size * num_images_per_prompt
        image = self.prepare_image(image, strength, num_inference_steps, timesteps, images, sigmas)
        do_cfg = self.uses_cfg(guidance_scale)

        # 1. encode_prompt
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
        )

        # 2. get_latent: the image's latents, noised to the first timestep that is kept.
        _, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps, sigmas)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        latents = self.get_latent(image, timesteps[:1].repeat(images), images, prompt_embeds.dtype, generator)

        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        add_time_ids = self.get_add_time_ids(original_size, crops_coords_top_left, target_size,
                                             prompt_embeds.dtype).repeat(images, 1)  # (B, 6)
        if do_cfg:
            # As in diffusers' img2img, the negative ids take the positive crop coordinates.
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
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))

    def vae_encode(self, image: torch.Tensor, batch_size: int, generator=None) -> torch.Tensor:
        """As Stable Diffusion's, but in float32 whenever the config says force_upcast (diffusers
        upcasts here whatever the VAE's dtype), the sample cast back to the pipeline's dtype."""
        upcast = bool(self.vae.config.force_upcast)
        latents = self.sample_posterior(image.float() if upcast else image, batch_size, generator, upcast)
        return self.vae.scale_latents(latents.to(image.dtype))
