"""The denoiser of Stable Diffusion: a text-conditioned UNet that predicts the noise (or v) in a latent.

diffusers twin: `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`).
Sources: the UNet of DDPM (Ho et al., arXiv 2006.11239) with the cross-attention conditioning of
latent diffusion (Rombach et al., arXiv 2112.10752); SDXL's micro-conditioning on image sizes
and crops (Podell et al., arXiv 2307.01952, section 2.2); the guidance-scale embedding of
latent consistency models (Luo et al., arXiv 2310.04378, `time_cond_proj_dim`).

    sample (B, in_channels, H, W), timestep, text (B, M, cross_attention_dim)
      1. time:  t -> sinusoidal features -> MLP = emb  (+ SDXL's text_time embedding)
      2. conv_in
      3. down:  each block halves H, W (but the last); every intermediate state is kept as a skip
      4. mid:   ResNet, transformer, ResNet at the lowest resolution
      5. up:    each block eats its skips (last in, first out) and doubles H, W (but the last)
      6. out:   GroupNorm, SiLU, conv_out -> (B, out_channels, H, W)

What users add around this path, each out of its way below: class labels (the SD2 x4 upscaler's
noise level), a projection of the text states (Kolors' `encoder_hid_dim_type="text_proj"`),
attention masks, the LoRA scale of `cross_attention_kwargs`, and residuals added from outside:
ControlNet's (Zhang et al., arXiv 2302.05543) to every skip and the mid block's output,
T2I-Adapter's (Mou et al., arXiv 2302.08453) to each down block's output.

The constructor takes diffusers' config keys, names and defaults. Keys for features that no SD
1.x, 2.x or SDXL checkpoint uses are in `unsupported_config`: a config carrying diffusers'
default for them loads, any other value raises, naming the key.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation
from .embeddings import TimestepEmbedding, Timesteps
from .lora_scale import lora_scale_from
from .modeling import ModelMixin
from .unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from ..configuration import register_to_config
from ..validation import check_finite_inputs

ADDITION_EMBED_TYPES = (None, "text_time")
SDXL_ADDED_COND_KEYS = ("text_embeds", "time_ids")
# None embeds class ids when num_class_embeds is set; "timestep" embeds numbers like t; the projections take vectors.
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ENCODER_HID_DIM_TYPES = (None, "text_proj")


class UNet2DConditionModel(ModelMixin):
    """SD 1.x / 2.x / SDXL UNet, inpainting (`in_channels=9`) and LCM (`time_cond_proj_dim`) variants included.

    diffusers: `models/unets/unet_2d_condition.py UNet2DConditionModel`. Module and parameter
    names are diffusers', so an official `unet/` checkpoint loads with `strict=True`.
    """

    # diffusers options pare has no code for -> diffusers' default, the one value pare accepts.
    unsupported_config = {
        "dual_cross_attention": False,  # versatile diffusion
        "class_embeddings_concat": False,  # class embedding concatenated to the time embedding
        "time_embedding_type": "positional",  # "fourier": score-SDE style
        "attention_type": "default",  # "gated": GLIGEN
    }

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                           "CrossAttnUpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple = 1,
        reverse_transformer_layers_per_block: tuple | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        upcast_attention: bool | None = False,
        resnet_time_scale_shift: str = "default",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        # diffusers hands these only to block types SD does not use (ResnetDownsampleBlock2D,
        # SimpleCrossAttn*, the "text" addition embedding): for SD's blocks they change nothing, in
        # diffusers as in pare. Accepted so that every official config loads; recorded, not used.
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        n = len(down_block_types)
        self._check_config(down_block_types, up_block_types, block_out_channels, num_attention_heads,
                           addition_embed_type, addition_time_embed_dim,
                           projection_class_embeddings_input_dim, norm_num_groups, transformer_layers_per_block,
                           reverse_transformer_layers_per_block)
        self.sample_size = sample_size

        # The heads quirk. diffusers' first UNets named the number of heads `attention_head_dim`,
        # and 40,000+ configs on the Hub now carry it under that name (SD1.5: 8 heads of dim
        # 40..160; SD2.1: [5, 10, 20, 20] heads of dim 64). diffusers keeps the name and reads it
        # as the head count (https://github.com/huggingface/diffusers/issues/2011), as pare does;
        # the real head dim is then out_channels // heads.
        heads = _per_block(attention_head_dim, n, "attention_head_dim")
        cross_attention_dim = _per_block(cross_attention_dim, n, "cross_attention_dim")
        layers_per_block = _per_block(layers_per_block, n, "layers_per_block")
        only_cross_attention = _per_block(only_cross_attention, n, "only_cross_attention")
        transformer_layers_per_block = _per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        reverse_transformer_layers = (list(reversed(transformer_layers_per_block))
                                      if reverse_transformer_layers_per_block is None
                                      else list(reverse_transformer_layers_per_block))

        # 1. time: sinusoidal features of t (block_out_channels[0] of them), then an MLP to 4x that width
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim)
        if addition_embed_type == "text_time":
            # SDXL: 6 size/crop numbers, each as addition_time_embed_dim sinusoidal features, then
            # concatenated with the pooled text embedding and projected like the timestep.
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        # Rarer conditioning: class labels (the x4 upscaler's noise level) and a projection of the text (Kolors).
        self.class_embedding = get_class_embedding(class_embed_type, num_class_embeds, block_out_channels[0],
                                                   time_embed_dim, act_fn, projection_class_embeddings_input_dim)
        self.encoder_hid_proj = get_encoder_hid_proj(encoder_hid_dim, encoder_hid_dim_type, cross_attention_dim[0])

        # 2. in
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)

        resnet = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout)

        def cross_attention(i: int, layers) -> dict:
            return dict(transformer_layers_per_block=layers, num_attention_heads=heads[i],
                        cross_attention_dim=cross_attention_dim[i], use_linear_projection=use_linear_projection,
                        upcast_attention=upcast_attention)

        # 3. down: block i goes from block_out_channels[i-1] to block_out_channels[i] channels
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block[i], in_channels=block_out_channels[max(i - 1, 0)],
                out_channels=block_out_channels[i], add_downsample=i < n - 1, downsample_padding=downsample_padding,
                cross_attention={**cross_attention(i, transformer_layers_per_block[i]),
                                 "only_cross_attention": only_cross_attention[i]}, **resnet,
            ))

        # 4. mid
        self.mid_block = get_mid_block(
            mid_block_type, in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
            cross_attention=cross_attention(-1, transformer_layers_per_block[-1]), **resnet,
        )

        # 5. up: the mirror image; each block has one ResNet more than its down twin, to eat the
        #    skip that the twin's downsampler (or conv_in) left.
        reversed_channels = list(reversed(block_out_channels))
        self.num_upsamplers = n - 1
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_block_types):
            r = n - 1 - i  # the down block this one mirrors
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block[r] + 1, in_channels=reversed_channels[min(i + 1, n - 1)],
                out_channels=reversed_channels[i], prev_output_channel=reversed_channels[max(i - 1, 0)],
                add_upsample=i < n - 1, resolution_idx=i,
                cross_attention={**cross_attention(r, reverse_transformer_layers[i]),
                                 "only_cross_attention": only_cross_attention[r]}, **resnet,
            ))

        # 6. out
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel,
                                  padding=(conv_out_kernel - 1) // 2)

    @staticmethod
    def _check_config(down_block_types, up_block_types, block_out_channels, num_attention_heads,
                      addition_embed_type, addition_time_embed_dim, projection_input_dim, norm_num_groups,
                      transformer_layers_per_block, reverse_transformer_layers_per_block):
        if len(down_block_types) != len(up_block_types) or len(down_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({len(block_out_channels)}) must have one entry per resolution each"
            )
        if num_attention_heads is not None:
            raise ValueError(
                f"num_attention_heads={num_attention_heads!r}: like diffusers, pare reads the number of heads from "
                "`attention_head_dim` (a naming mistake kept for the configs on the Hub, see "
                "https://github.com/huggingface/diffusers/issues/2011); set attention_head_dim instead"
            )
        if addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={addition_embed_type!r} is not implemented in pare; "
                             f"expected one of {ADDITION_EMBED_TYPES} (None for SD 1.x/2.x, 'text_time' for SDXL)")
        if addition_embed_type == "text_time" and None in (addition_time_embed_dim, projection_input_dim):
            raise ValueError(f"addition_embed_type='text_time' (SDXL) needs addition_time_embed_dim (SDXL: 256) and "
                             f"projection_class_embeddings_input_dim (SDXL: 2816), got {addition_time_embed_dim!r} "
                             f"and {projection_input_dim!r}")
        if norm_num_groups is None:
            raise ValueError("norm_num_groups=None: the ResNet blocks of SD's UNet GroupNorm their input, so "
                             "norm_num_groups must be a number (32 in every SD checkpoint)")
        nested = not isinstance(transformer_layers_per_block, int) and any(
            not isinstance(x, int) for x in transformer_layers_per_block)
        if nested and reverse_transformer_layers_per_block is None:
            raise ValueError("transformer_layers_per_block gives per-layer counts (a list of lists), so the up "
                             "blocks' counts cannot be mirrored: set reverse_transformer_layers_per_block too")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        timestep_cond: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """The prediction (noise, or v for v-prediction checkpoints), shaped like `sample` with out_channels.

        sample: (B, in_channels, H, W) latents, any H and W.
        timestep: an int or float, or a tensor of shape () or (1,) (broadcast over the batch) or (B,) (one per sample).
        encoder_hidden_states: (B, M, cross_attention_dim) text embeddings (encoder_hid_dim wide, Kolors).
        added_cond_kwargs: SDXL only: {"text_embeds": (B, pooled dim), "time_ids": (B, 6)}.
        timestep_cond: LCM only: (B, time_cond_proj_dim) guidance-scale embedding, added to the time features.
        encoder_attention_mask: (B, M), 1 = attend to the text token, 0 = ignore it.

        What users add around the UNet (all optional; arguments and meaning as in diffusers):
        class_labels: (B,) for UNets with a class embedding (the x4 upscaler: the noise level), (B, D) for projections.
        attention_mask: (B, N), 1 = keep, 0 = ignore, over the N keys of every first attention (the image
            tokens, so it fits only UNets whose transformers all work at one resolution, as in diffusers).
        cross_attention_kwargs: {"scale": s}, the LoRA scale of this call (`pare.models.lora_scale`).
        down_block_additional_residuals, mid_block_additional_residual: ControlNet's, one per skip and one for
            the mid block's output, added to them (pass both).
        down_intrablock_additional_residuals: T2I-Adapter's feature maps, one per down block, added to its output.
        """
        # NaN or inf here would turn every output value NaN (diffusers runs on): refuse it by name.
        check_finite_inputs(type(self).__name__, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                            timestep_cond=timestep_cond, **(added_cond_kwargs or {}))
        timesteps = self._check_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                                       class_labels)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            # diffusers takes down residuals alone for T2I-Adapter's (deprecated) and ignores a mid one alone.
            raise ValueError("ControlNet residuals come as a pair: pass down_block_additional_residuals and "
                             "mid_block_additional_residual together (T2I-Adapter features go in "
                             "down_intrablock_additional_residuals)")
        # Everything the transformers take, per call: text, masks as additive biases, the LoRA scale.
        attn = dict(encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=attention_bias(encoder_attention_mask, sample.dtype),
                    attention_mask=attention_bias(attention_mask, sample.dtype),
                    lora_scale=lora_scale_from(cross_attention_kwargs))
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        # When H or W is not a multiple of 2**num_upsamplers, a downsampler rounds a size up (ceil(H/2)),
        # and 2x upsampling would miss its skip's size: the up blocks then upsample to the skip's size.
        forward_upsample_size = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])

        # 1. time. The sinusoidal features are float32 whatever the model dtype; cast as diffusers does.
        t_emb = self.time_proj(timesteps).to(sample.dtype)  # (B, block_out_channels[0])
        emb = self.time_embedding(t_emb, timestep_cond)  # (B, time_embed_dim)
        if self.class_embedding is not None:
            emb = emb + class_embed(self, class_labels, sample.dtype)
        if self.config.addition_embed_type == "text_time":
            emb = emb + text_time_embed(self, added_cond_kwargs, emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:  # Kolors: the text encoder's width -> cross_attention_dim
            attn["encoder_hidden_states"] = self.encoder_hid_proj(encoder_hidden_states)

        # 2. in
        sample = self.conv_in(sample)  # (B, C0, H, W)

        # 3. down
        adapter = list(down_intrablock_additional_residuals or ())  # T2I-Adapter: taken one per block, in order
        skips = (sample,)
        for block in self.down_blocks:
            extra = adapter.pop(0) if adapter else None
            if block.has_cross_attention:
                sample, states = block(sample, emb, **attn, additional_residuals=extra)
            else:
                sample, states = block(sample, emb, attn["lora_scale"], additional_residuals=extra)
            skips += states
        if down_block_additional_residuals is not None:  # ControlNet
            skips = add_residuals(skips, down_block_additional_residuals, "down_block_additional_residuals")

        # 4. mid
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, **attn)
            if adapter and adapter[0].shape == sample.shape:  # T2I-Adapter-XL's last map goes to the mid block
                sample = sample + adapter.pop(0)
        if mid_block_additional_residual is not None:  # ControlNet
            sample = sample + mid_block_additional_residual
        if adapter:
            raise ValueError(f"down_intrablock_additional_residuals: {len(adapter)} feature maps were left over; "
                             f"pass one per down block ({len(self.down_blocks)}), plus one for the mid block")

        # 5. up
        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            n_skips = len(block.resnets)
            res_samples, skips = skips[-n_skips:], skips[:-n_skips]
            if forward_upsample_size and i < len(self.up_blocks) - 1:
                upsample_size = skips[-1].shape[2:]  # the size of the next block's first skip
            if block.has_cross_attention:
                sample = block(sample, res_samples, emb, upsample_size=upsample_size, **attn)
            else:
                sample = block(sample, res_samples, emb, upsample_size, attn["lora_scale"])

        # 6. out
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, out_channels, H, W)
        return sample

    def _check_inputs(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                      class_labels=None) -> torch.Tensor:
        """Validate the inputs; return the timesteps as a (B,) tensor on the sample's device."""
        return check_inputs(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                            class_labels)


# --- shared with ControlNetModel, which copies the UNet's embeddings and down half ------------------


def get_class_embedding(class_embed_type: str | None, num_class_embeds: int | None, time_input_dim: int,
                        time_embed_dim: int, act_fn: str, projection_dim: int | None) -> nn.Module | None:
    """The class embedding by its config (diffusers: `UNet2DConditionModel._set_class_embedding`), or None."""
    if class_embed_type not in CLASS_EMBED_TYPES:
        raise ValueError(f"class_embed_type={class_embed_type!r} is not implemented in pare; "
                         f"expected one of {CLASS_EMBED_TYPES}")
    if class_embed_type is None:  # ids 0..num_class_embeds-1 (the x4 upscaler's noise levels), or no class labels
        return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
    if class_embed_type == "timestep":  # numbers embedded like t: sinusoids, then their own MLP
        return TimestepEmbedding(time_input_dim, time_embed_dim, act_fn=act_fn)
    if class_embed_type == "identity":
        return nn.Identity()
    if projection_dim is None:
        raise ValueError(f"class_embed_type={class_embed_type!r} projects (B, D) class vectors, so it needs "
                         "projection_class_embeddings_input_dim = D")
    if class_embed_type == "projection":  # the timestep MLP, on the vectors themselves
        return TimestepEmbedding(projection_dim, time_embed_dim)
    return nn.Linear(projection_dim, time_embed_dim)  # "simple_projection"


def get_encoder_hid_proj(encoder_hid_dim: int | None, encoder_hid_dim_type: str | None,
                         cross_attention_dim: int) -> nn.Module | None:
    """Kolors' text projection (diffusers: `UNet2DConditionModel._set_encoder_hid_proj`, "text_proj"), or None."""
    if encoder_hid_dim_type not in ENCODER_HID_DIM_TYPES:
        raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} is not implemented in pare; expected one "
                         f"of {ENCODER_HID_DIM_TYPES} (Kandinsky's and IP-Adapter's image projections are not ported)")
    if encoder_hid_dim_type is not None and encoder_hid_dim is None:
        raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} needs encoder_hid_dim, the text "
                         "encoder's width")
    if encoder_hid_dim is None:
        return None
    # encoder_hid_dim alone means "text_proj", as in diffusers.
    return nn.Linear(encoder_hid_dim, cross_attention_dim)


def attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A 0/1 mask (B, K), 1 = keep, -> the additive bias (B, 1, K): 0 to keep, -10000 to discard, as diffusers does."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def class_embed(model: nn.Module, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The class labels' embedding (B, time_embed_dim), added to the time embedding."""
    if model.config.class_embed_type == "timestep":
        class_labels = model.time_proj(class_labels).to(dtype)  # float32 sinusoids, cast as diffusers does
    return model.class_embedding(class_labels).to(dtype)


def text_time_embed(model: nn.Module, added_cond_kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning (arXiv 2307.01952, section 2.2): pooled text + embedded size/crop ids."""
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    time_embeds = model.add_time_proj(time_ids.flatten())  # (B*6, addition_time_embed_dim), float32
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6*addition_time_embed_dim)
    # The concatenation happens in float32 (the ids' features are float32) and is cast after, as in diffusers.
    add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(dtype)  # (B, projection_..._input_dim)
    return model.add_embedding(add_embeds)  # (B, time_embed_dim)


def add_residuals(skips: tuple, residuals, name: str) -> tuple:
    """ControlNet's residuals added to the UNet's skips, one to one (diffusers zips them, silently dropping extras)."""
    if len(residuals) != len(skips) or any(r.shape != s.shape for r, s in zip(residuals, skips)):
        raise ValueError(f"{name}: got {[tuple(r.shape) for r in residuals]}, but this UNet's skips are "
                         f"{[tuple(s.shape) for s in skips]}: pass one residual per skip, shaped like it")
    return tuple(skip + residual for skip, residual in zip(skips, residuals))


def check_inputs(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                 class_labels) -> torch.Tensor:
    """Validate a UNet's (or ControlNet's) inputs; return the timesteps as a (B,) tensor on the sample's device."""
    config = model.config
    if sample.ndim != 4 or sample.shape[1] != config.in_channels:
        raise ValueError(f"sample must be (B, {config.in_channels}, H, W) (in_channels={config.in_channels}), "
                         f"got shape {tuple(sample.shape)}")
    batch = sample.shape[0]

    if not torch.is_tensor(timestep):
        # float32 (not diffusers' float64): the sinusoidal features round t to float32 anyway, and MPS has no float64.
        dtype = torch.float32 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
        raise ValueError(f"timestep must be a number, or a tensor of shape (), (1,) or (B,) = ({batch},), "
                         f"got shape {tuple(timestep.shape)}")
    timesteps = timestep.reshape(-1).to(sample.device).expand(batch)  # (B,)

    if config.get("encoder_hid_dim") is not None:
        dims = [config.encoder_hid_dim]
    else:
        dims = sorted(set(_per_block(config.cross_attention_dim, len(config.down_block_types), "cross_attention_dim")))
    if (encoder_hidden_states is None or encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch or encoder_hidden_states.shape[2] not in dims):
        got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
        raise ValueError(f"encoder_hidden_states must be (B, tokens, cross_attention_dim) = ({batch}, M, "
                         f"{'|'.join(map(str, sorted(dims)))}), with the batch size of sample, got {got}")

    if timestep_cond is not None and config.get("time_cond_proj_dim") is None:
        raise ValueError("timestep_cond was given, but this model has no time_cond_proj_dim (only LCM-distilled "
                         "UNets embed a guidance scale)")
    if model.class_embedding is not None and class_labels is None:
        raise ValueError(f"this model has a class embedding (class_embed_type={config.class_embed_type!r}, "
                         f"num_class_embeds={config.num_class_embeds!r}), so forward() needs class_labels (B,)")
    if model.class_embedding is None and class_labels is not None:
        raise ValueError("class_labels were given, but this model has no class embedding (num_class_embeds and "
                         "class_embed_type are None)")

    if config.addition_embed_type == "text_time":
        for key in SDXL_ADDED_COND_KEYS:
            if added_cond_kwargs is None or key not in added_cond_kwargs:
                raise ValueError(f"this model has addition_embed_type='text_time' (SDXL), so forward() needs "
                                 f"added_cond_kwargs[{key!r}]; it takes the keys {SDXL_ADDED_COND_KEYS}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        width = text_embeds.shape[-1] + time_ids.shape[-1] * config.addition_time_embed_dim
        if (text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch
                or time_ids.shape[0] != batch or width != config.projection_class_embeddings_input_dim):
            raise ValueError(
                f"added_cond_kwargs: text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} "
                f"must be (B, D) and (B, K) with B = {batch} and D + K * addition_time_embed_dim "
                f"({config.addition_time_embed_dim}) = projection_class_embeddings_input_dim "
                f"({config.projection_class_embeddings_input_dim}); SDXL base: D = 1280, K = 6"
            )
    return timesteps


def _per_block(value, n: int, key: str) -> list:
    """A config value given once for all blocks, or once per block (checked to have n entries)."""
    if isinstance(value, (int, float, bool)) or value is None:
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{key}={list(value)!r} has {len(value)} entries, but there are {n} down blocks")
    return list(value)
