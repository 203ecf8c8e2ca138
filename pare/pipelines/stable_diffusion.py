"""Stable Diffusion 1.x / 2.x, text-to-image and image-to-image, in four steps.

    1. encode_prompt   text -> CLIP hidden states, (B, 77, D)          transformers CLIPTextModel
    2. get_latent      seeded Gaussian noise, (B, 4, H/8, W/8)         img2img: the image's latents, noised
    3. denoise         UNet + scheduler, classifier-free guidance      pare/models/unet_2d_condition.py, pare/schedulers
    4. vae_decode      latents -> pixels, (B, 3, H, W)                 pare/models/autoencoder_kl.py

diffusers twins: `pipelines/stable_diffusion/pipeline_stable_diffusion.py` (StableDiffusionPipeline)
and `pipeline_stable_diffusion_img2img.py` (StableDiffusionImg2ImgPipeline). Every step computes
what its twin computes, in the same order and dtypes, so that one seed gives one image in both;
where diffusers has a quirk that changes the numbers, pare keeps it and says so.

Papers: latent diffusion, Rombach et al., arXiv 2112.10752; classifier-free guidance, Ho &
Salimans, arXiv 2207.12598; SDEdit (img2img), Meng et al., arXiv 2108.01073.
"""

from __future__ import annotations

import logging

import torch

from ..validation import check_call_arguments
from .pipeline_utils import (
    OUTPUT_TYPES,
    PipelineMixin,
    PipelineOutput,
    check_timestep_inputs,
    extra_step_kwargs,
    guidance_scale_embedding,
    postprocess_image,
    preprocess_image,
    randn_tensor,
    rescale_noise_cfg,
    retrieve_timesteps,
    step_callback,
)

logger = logging.getLogger("pare")


def tokenize(tokenizer, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded (and cut) to the tokenizer's length, 77 for CLIP: (B, T). Warns about what is cut."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        cut = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        logger.warning("CLIP reads at most %d tokens; this part of the prompt was cut: %s", max_length, cut)
    return ids


class StableDiffusionPipeline(PipelineMixin):
    """Text-to-image with Stable Diffusion 1.x / 2.x (diffusers: StableDiffusionPipeline; arXiv 2112.10752).

    There is no safety checker: a model_index.json's safety_checker and feature_extractor are ignored.
    """

    component_kinds = {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "unet": "unet",
                       "scheduler": "scheduler"}
    # What a step callback may read and replace.
    callback_tensor_inputs = ("latents", "prompt_embeds")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ValueError("this UNet is an SDXL UNet (addition_embed_type='text_time'): "
                             "use StableDiffusionXLPipeline")
        hidden = text_encoder.config.hidden_size
        if hidden != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoder's hidden size ({hidden}) must equal the UNet's cross_attention_dim "
                             f"({unet.config.cross_attention_dim}): the two come from different models")
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.scheduler = self.fix_legacy_scheduler(scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD's 4-level VAE

    @staticmethod
    def fix_legacy_scheduler(scheduler):
        """diffusers' SD pipelines rewrite two outdated scheduler settings when they are built
        (steps_offset -> 1, clip_sample -> False). pare does the same, with a warning, so that one
        folder gives one image in both libraries."""
        fixes = {}
        if getattr(scheduler.config, "steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if getattr(scheduler.config, "clip_sample", False) is True:
            fixes["clip_sample"] = False
        if not fixes:
            return scheduler
        logger.warning("%s config is outdated for Stable Diffusion: using %s, as diffusers does",
                       type(scheduler).__name__, fixes)
        return type(scheduler).from_config(scheduler.config, **fixes)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> PipelineOutput:
        """Generate images from text. Arguments, names and defaults are diffusers'.

        timesteps / sigmas: a custom descending schedule, for schedulers whose set_timesteps takes
        one (timesteps: DDPM, Euler, Heun, DPM-Solver, LCM; sigmas: Euler, UniPC, EDM Euler).
        guidance_scale: CFG weight w (Ho & Salimans eq. 6); guidance is off at w <= 1.
        guidance_rescale: phi of Lin et al., arXiv 2305.08891 section 3.4 (0: off).
        clip_skip: use the CLIP layer this many below the last (1: the penultimate), then the final norm.
        callback_on_step_end(pipe, step, timestep, tensors) -> dict: called after every step with the
        tensors named in callback_on_step_end_tensor_inputs; the tensors it returns replace them.
        """
        check_call_arguments(self, locals())  # numbers, embeddings, images: before any model runs
        height = height or self.default_size()
        width = width or self.default_size()
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, height, width, latents,
            sigmas=sigmas,
        )
        do_cfg = self.uses_cfg(guidance_scale)

        # 1. encode_prompt: text -> CLIP hidden states; with CFG the unconditional half goes first.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, T, D)

        # 2. get_latent: Gaussian noise, scaled to the scheduler's first sigma.
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps, sigmas)
        latents = self.get_latent(batch_size * num_images_per_prompt, height, width, prompt_embeds.dtype,
                                  generator, latents)

        # 3. denoise
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
            extra_step_kwargs(self.scheduler, generator, eta),
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))

    # --- the four steps ---------------------------------------------------------------------

    def encode_prompt(self, prompt, num_images_per_prompt: int, do_cfg: bool, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, clip_skip: int | None = None):
        """Prompts -> (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, T, D).

        negative_prompt_embeds is None without CFG. An absent negative prompt is the empty string.
        """
        device, dtype = self.device, self.text_encoder.dtype
        if prompt_embeds is None:
            prompt_embeds = self.clip_hidden_states([prompt] if isinstance(prompt, str) else prompt, clip_skip)
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_cfg:
            return prompt_embeds, None

        if negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch_size
            # diffusers encodes the negative prompt from CLIP's last layer whatever clip_skip says; pare
            # keeps that for parity.
            negative_prompt_embeds = self.clip_hidden_states(negative_prompt, None, max_length=prompt_embeds.shape[1])
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    # The prompt and its negative each go through clip_hidden_states at CLIP's full length, one row per text:
    # pare/fast/prompt.py may run them as one batch. A subclass that encodes otherwise overrides encode_prompt.
    encode_prompt.one_clip_call_each = True

    def clip_hidden_states(self, texts: list[str], clip_skip: int | None, max_length: int | None = None):
        """CLIP's last hidden state (B, T, D), after its final LayerNorm, or with clip_skip the
        state of the layer clip_skip below the last, put through that same final LayerNorm."""
        ids = tokenize(self.tokenizer, texts, max_length).to(self.device)
        if clip_skip is None:
            return self.text_encoder(ids).last_hidden_state
        hidden_states = self.text_encoder(ids, output_hidden_states=True).hidden_states  # embeddings + each layer
        # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`; huggingface/transformers#46285),
        # which breaks diffusers 0.42.1's clip_skip (huggingface/diffusers#14124); pare reads either layout.
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(hidden_states[-(clip_skip + 1)])

    def get_latent(self, batch_size: int, height: int, width: int, dtype: torch.dtype, generator=None, latents=None):
        """x_T ~ N(0, sigma_max^2 I), (B, 4, H/8, W/8): drawn as diffusers draws it, or the `latents` given."""
        if latents is None:
            shape = self.latent_shape(batch_size, height, width)
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        else:
            latents = latents.to(self.device)
        return latents * self.scheduler.init_noise_sigma  # 1 for DDPM/DDIM; sigma_max for Karras-style samplers

    def denoise(self, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
                callback_inputs=("latents",)):
        """The sampling loop: predict the noise with the UNet, guide it, let the scheduler step.

        Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, eq. 6): the UNet sees the batch
        twice, unconditional half first, and eps = eps_uncond + w * (eps_text - eps_uncond).

        The loop is the same for every scheduler, as diffusers' is: `scale_model_input` before the
        UNet (x / sqrt(sigma^2 + 1) for the Karras-style ones), `step` after it. `timesteps` holds
        one entry per UNet call, so a second-order scheduler (Heun, KDPM2: `scheduler.order` 2)
        lists its timesteps twice and keeps the half-step in its own state.
        """
        do_cfg = self.uses_cfg(guidance_scale)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # an LCM-distilled UNet takes w - 1 as an input
            w = torch.tensor(guidance_scale - 1.0).repeat(latents.shape[0])  # (B,)
            timestep_cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=latents.device, dtype=latents.dtype)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents  # (B, 4, h, w) -> (2B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                                   added_cond_kwargs=added_cond_kwargs)
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                if guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **(step_kwargs or {})).prev_sample
            latents, prompt_embeds = step_callback(self, callback, i, t, latents, prompt_embeds, callback_inputs)
        return latents

    # This loop reads only its arguments, self.unet and self.scheduler: pare/fast/loop.py may replay it whole
    # from one CUDA graph. A subclass whose loop reads more (a condition image, a mask) overrides denoise.
    denoise.reads_only_arguments = True

    def vae_decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images. The UNet's latents are the VAE's scaled by scaling_factor (0.18215) to
        unit variance (arXiv 2112.10752 section 4.3.2); undo that, decode, map [-1, 1] to output_type.

        Decoding runs in the VAE's own dtype, float16 included, as in diffusers' SD pipelines (only
        SDXL's upcast); `decode_safely` redoes a float16 decode that overflowed in float32.
        """
        if output_type == "latent":
            return latents
        image = self.vae.decode_safely(self.vae.unscale_latents(latents), upcast=False)
        return postprocess_image(image, output_type)

    # --- checks ---------------------------------------------------------------------------

    def uses_cfg(self, guidance_scale: float) -> bool:
        """CFG runs for w > 1, except on an LCM-distilled UNet (`time_cond_proj_dim`), which takes w as an input."""
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.vae_scale_factor
        return batch_size, self.unet.config.in_channels, height // s, width // s  # (B, 4, H/8, W/8)

    def default_size(self) -> int:
        sample_size = self.unet.config.sample_size
        return (sample_size if isinstance(sample_size, int) else sample_size[0]) * self.vae_scale_factor

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                     generator, output_type, callback_inputs, num_inference_steps, timesteps, height=None, width=None,
                     latents=None, sigmas=None) -> int:
        """Refuse bad arguments before any work is done; return the number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            if isinstance(prompt, list) and not prompt:
                raise ValueError("`prompt` is an empty list: pass at least one prompt")
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
                raise TypeError(f"`prompt` must be a str or a list of str, not {type(prompt).__name__}")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch_size} "
                             f"prompts: pass one negative prompt per prompt, or a single string for all")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise TypeError(f"`negative_prompt` must be a str or a list of str, not {type(negative_prompt).__name__}")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                                 f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

        if height is not None and (height % 8 or width % 8):
            raise ValueError(f"`height` and `width` must be multiples of 8, got {height} x {width}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive int, got {num_images_per_prompt!r}")
        check_timestep_inputs(self.scheduler, num_inference_steps, timesteps, sigmas)
        images = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(f"{len(generator)} generators were passed for {images} images "
                             f"({batch_size} prompts x {num_images_per_prompt} per prompt): pass one per image")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in callback_inputs if k not in self.callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; "
                             f"choose from {list(self.callback_tensor_inputs)}")
        if latents is not None:
            shape = self.latent_shape(images, height, width)
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` has shape {tuple(latents.shape)}; {height} x {width} images need {shape}")
        return batch_size


class Img2ImgMixin:
    """Image-to-image by SDEdit (Meng et al., arXiv 2108.01073): start the reverse process not
    from pure noise but from the image's latents noised to the timestep a fraction `strength`
    of the way up the schedule, and run only the steps below it. Step 2 is the one that differs."""

    def get_timesteps(self, num_inference_steps: int, strength: float):
        """The last `strength` fraction of the schedule: int(steps * strength) steps."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        order = getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * order)
        return self.scheduler.timesteps[t_start * order :]

    def get_latent(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int, dtype, generator=None):
        """x_t ~ q(x_t | x_0) (DDPM eq. 4) with x_0 the image's latents, tiled to the batch."""
        image = image.to(device=self.device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:  # latents given as the image
            init_latents = image
        else:
            init_latents = self.vae_encode(image, batch_size, generator)
        init_latents = torch.cat([init_latents] * (batch_size // init_latents.shape[0]))  # (B, 4, h, w)
        noise = randn_tensor(init_latents.shape, generator=generator, device=self.device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    def vae_encode(self, image: torch.Tensor, batch_size: int, generator=None) -> torch.Tensor:
        """Pixels in [-1, 1] -> a sample of the VAE posterior, scaled for the UNet (in the VAE's dtype)."""
        return self.vae.scale_latents(self.sample_posterior(image, batch_size, generator, upcast=False))

    def sample_posterior(self, image, batch_size: int, generator=None, upcast: bool = False):
        if not isinstance(generator, list):
            return self.vae.encode_safely(image, upcast=upcast).sample(generator)
        # One generator per image: tile the images to the batch first, then encode one at a time.
        image = torch.cat([image] * (batch_size // image.shape[0]))
        return torch.cat([self.vae.encode_safely(image[i : i + 1], upcast=upcast).sample(generator[i])
                          for i in range(batch_size)])

    def prepare_image(self, image, strength: float, num_inference_steps: int, timesteps, images: int,
                      sigmas=None) -> torch.Tensor:
        """Check `image` and `strength` and preprocess the image, before any work is done."""
        if image is None:
            raise ValueError("img2img needs an `image`")
        if not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}: it is the fraction of the schedule "
                             f"to run, 1 being a full text-to-image run from noise")
        custom = timesteps if timesteps is not None else sigmas
        steps = len(custom) if custom is not None else num_inference_steps
        if int(steps * strength) < 1:
            raise ValueError(f"strength {strength} x {steps} steps leaves no denoising step (int({steps} x "
                             f"{strength}) = 0): raise `strength` or `num_inference_steps`")
        pixels = preprocess_image(image, self.vae_scale_factor, self.vae.config.latent_channels)
        if images % pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images cannot be spread over {images} outputs: pass one image, "
                             f"or as many as prompts x num_images_per_prompt")
        return pixels


class StableDiffusionImg2ImgPipeline(Img2ImgMixin, StableDiffusionPipeline):
    """Image-to-image with Stable Diffusion 1.x / 2.x (diffusers: StableDiffusionImg2ImgPipeline; SDEdit,
    arXiv 2108.01073). Same four steps; step 2 starts from the image. guidance_rescale is an
    addition: diffusers' SD img2img has no such argument."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> PipelineOutput:
        """Redraw `image` (PIL, numpy or torch, values in [0, 1]) following the prompt.

        strength: how far up the noise schedule the image is pushed, in (0, 1]; int(steps * strength)
        steps are run. Other arguments as in StableDiffusionPipeline.__call__.
        """
        check_call_arguments(self, locals())  # numbers, embeddings, images: before any model runs
        batch_size = self.check_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
            output_type, callback_on_step_end_tensor_inputs, num_inference_steps, timesteps, sigmas=sigmas,
        )
        images = batch_size * num_images_per_prompt
        image = self.prepare_image(image, strength, num_inference_steps, timesteps, images, sigmas)
        do_cfg = self.uses_cfg(guidance_scale)

        # 1. encode_prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip
        )
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, T, D)

        # 2. get_latent: the image's latents, noised to the first timestep that is kept.
        _, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, timesteps, sigmas)
        timesteps = self.get_timesteps(num_inference_steps, strength)
        latent_timestep = timesteps[:1].repeat(images)
        latents = self.get_latent(image, latent_timestep, images, prompt_embeds.dtype, generator)

        # 3. denoise
        latents = self.denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale,
            extra_step_kwargs(self.scheduler, generator, eta),
            callback=callback_on_step_end, callback_inputs=callback_on_step_end_tensor_inputs,
        )

        # 4. vae_decode
        return PipelineOutput(images=self.vae_decode(latents, output_type))
