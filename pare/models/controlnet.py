"""ControlNet: a trainable copy of the UNet's down half that reads an image condition (edges, depth, pose).

diffusers twin: `models/controlnets/controlnet.py` (`ControlNetModel`, `ControlNetConditioningEmbedding`).
Source: Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models"
(arXiv 2302.05543), section 3 (eq. 1-2: the zero convolutions; section 3.2: the condition encoder)
and section 4.3 ("guess mode", the CFG-resolution weighting).

    sample (B, 4, h, w), t, text (B, M, D), condition image (B, 3, 8h, 8w)
      1. time:  the UNet's time (and class / SDXL) embedding
      2. in:    conv_in(sample) + E(condition)        E: 4x4-strided conv encoder, zero-initialised output
      3. down:  the UNet's down blocks (pare's blocks, built from the same config), keeping every skip
      4. mid:   the UNet's mid block
      5. out:   a zero-initialised 1x1 conv on each skip and on the mid output, times conditioning_scale

The outputs are what `UNet2DConditionModel.forward` takes as `down_block_additional_residuals`
and `mid_block_additional_residual`. At initialisation (`from_unet`) the zero convolutions make
them zero, so the UNet starts unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedding, Timesteps
from .lora_scale import lora_scale_from
from .modeling import ModelMixin
from .unet_2d_blocks import get_down_block, get_mid_block
from .unet_2d_condition import (
    ADDITION_EMBED_TYPES,
    attention_bias,
    check_inputs,
    class_embed,
    get_class_embedding,
    text_time_embed,
    _per_block,
)
from ..configuration import register_to_config

CHANNEL_ORDERS = ("rgb", "bgr")


class ControlNetOutput(NamedTuple):
    """The residuals for the UNet: one per skip (B, C_i, h_i, w_i), and one for the mid block's output."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


class ControlNetConditioningEmbedding(nn.Module):
    """The condition encoder E: image (B, 3, 8h, 8w) -> features (B, C0, h, w) (arXiv 2302.05543, section 3.2).

    diffusers: `models/controlnets/controlnet.py ControlNetConditioningEmbedding`. conv_in, then per
    stage a 3x3 conv and a stride-2 3x3 conv, SiLU after each, then a zero-initialised conv_out.
    """

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for channels_in, channels_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(channels_in, channels_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = zero_module(nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3,
                                              padding=1))

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))  # (B, c_0, H, W)
        for block in self.blocks:  # every second conv halves H and W
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)  # (B, C0, H / 2^(stages-1), W / 2^(stages-1))


def zero_module(module: nn.Module) -> nn.Module:
    """The paper's "zero convolution" (arXiv 2302.05543, eq. 1): weights and biases start at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetModel(ModelMixin):
    """ControlNet for SD 1.x / 2.x (4 stages) and SDXL (3 stages, text_time embedding).

    diffusers: `models/controlnets/controlnet.py ControlNetModel`. Module and parameter names are
    diffusers', so an official ControlNet folder (config.json + diffusion_pytorch_model.safetensors)
    loads with `strict=True`; `from_unet` makes one from a UNet, as diffusers does for training.
    """

    # diffusers options pare has no code for -> diffusers' default, the one value pare accepts.
    unsupported_config = {
        # diffusers builds this projection but its ControlNet forward never applies it; no published ControlNet has one
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,  # for the "text" addition embedding, which SD does not use
    ):
        super().__init__()
        n = len(down_block_types)
        self._check_config(block_out_channels, down_block_types, num_attention_heads, addition_embed_type,
                           class_embed_type, controlnet_conditioning_channel_order, layers_per_block)
        # The heads quirk of the UNet (see unet_2d_condition.py): attention_head_dim holds the head count.
        heads = _per_block(attention_head_dim, n, "attention_head_dim")
        only_cross_attention = _per_block(only_cross_attention, n, "only_cross_attention")
        transformer_layers_per_block = _per_block(transformer_layers_per_block, n, "transformer_layers_per_block")

        # 1. time, as in the UNet (the same module names, so from_unet copies them)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        # diffusers' ControlNet gives the "timestep" class embedding the default SiLU, whatever act_fn says.
        self.class_embedding = get_class_embedding(class_embed_type, num_class_embeds, block_out_channels[0],
                                                   time_embed_dim, "silu", projection_class_embeddings_input_dim)
        if addition_embed_type == "text_time":  # SDXL
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        # 2. the condition encoder
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            block_out_channels[0], conditioning_channels, conditioning_embedding_out_channels)

        # 3. down: the UNet's blocks, and a zero conv for every skip they leave (conv_in's first)
        resnet = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift)

        def cross_attention(i: int) -> dict:
            return dict(transformer_layers_per_block=transformer_layers_per_block[i], num_attention_heads=heads[i],
                        cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
                        upcast_attention=upcast_attention)

        def zero_conv(channels: int) -> nn.Conv2d:
            return zero_module(nn.Conv2d(channels, channels, kernel_size=1))

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(block_out_channels[0])])
        for i, block_type in enumerate(down_block_types):
            channels, last = block_out_channels[i], i == n - 1
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=block_out_channels[max(i - 1, 0)],
                out_channels=channels, add_downsample=not last, downsample_padding=downsample_padding,
                cross_attention={**cross_attention(i), "only_cross_attention": only_cross_attention[i]}, **resnet,
            ))
            skips = layers_per_block + (0 if last else 1)  # one per ResNet, and the downsampler's
            self.controlnet_down_blocks.extend(zero_conv(channels) for _ in range(skips))

        # 4. mid, and its zero conv
        self.controlnet_mid_block = zero_conv(block_out_channels[-1])
        self.mid_block = get_mid_block(mid_block_type, in_channels=block_out_channels[-1],
                                       output_scale_factor=mid_block_scale_factor,
                                       cross_attention=cross_attention(-1), **resnet)

    @staticmethod
    def _check_config(block_out_channels, down_block_types, num_attention_heads, addition_embed_type,
                      class_embed_type, channel_order, layers_per_block):
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(f"block_out_channels ({len(block_out_channels)}) and down_block_types "
                             f"({len(down_block_types)}) must have one entry per resolution each")
        if num_attention_heads is not None:
            raise ValueError(f"num_attention_heads={num_attention_heads!r}: like the UNet, pare reads the number of "
                             "heads from `attention_head_dim` (diffusers issue 2011); set attention_head_dim instead")
        if addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={addition_embed_type!r} is not implemented in pare; "
                             f"expected one of {ADDITION_EMBED_TYPES}")
        if class_embed_type == "simple_projection":
            # diffusers' ControlNet has no branch for it and silently builds no class embedding.
            raise ValueError("class_embed_type='simple_projection': diffusers' ControlNetModel does not build it "
                             "(it would ignore the class labels), so pare refuses it")
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"controlnet_conditioning_channel_order={channel_order!r}; expected one of "
                             f"{CHANNEL_ORDERS}")
        if not isinstance(layers_per_block, int):
            raise ValueError(f"layers_per_block={layers_per_block!r}: a ControlNet takes one count for every block, "
                             "as diffusers' ControlNetModel does")

    @classmethod
    def from_unet(cls, unet, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3) -> "ControlNetModel":
        """A ControlNet with `unet`'s architecture and (by default) its weights, zero convs at zero.

        diffusers: `ControlNetModel.from_unet`, the start of ControlNet training (arXiv 2302.05543, section 3.3).
        """
        shared = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                  "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
                  "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                  "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                  "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                  "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
                  "projection_class_embeddings_input_dim", "encoder_hid_dim", "encoder_hid_dim_type")
        config = {k: unet.config[k] for k in shared if k in unet.config}
        with torch.device(unet.device):
            controlnet = cls.from_config({
                **config, "controlnet_conditioning_channel_order": controlnet_conditioning_channel_order,
                "conditioning_embedding_out_channels": conditioning_embedding_out_channels,
                "conditioning_channels": conditioning_channels,
            }).to(unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks",
                         "mid_block"):
                if getattr(controlnet, name, None) is not None:
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput:
        """The residuals for the UNet, as a `ControlNetOutput` (a named tuple: `down, mid = controlnet(...)`).

        sample, timestep, encoder_hidden_states, class_labels, added_cond_kwargs: as for the UNet.
        controlnet_cond: (B, conditioning_channels, H, W) image in [0, 1], H and W 8 times the latents'.
        conditioning_scale: weight of the residuals. guess_mode: weight them 0.1 ... 1 from the first
        skip to the mid block (arXiv 2302.05543, section 4.3), for use without a prompt.
        attention_mask: (B, N) 0/1 mask for the first attention, as for the UNet. `return_dict` is
        accepted for diffusers' callers; the named tuple serves both forms.
        """
        timesteps = check_inputs(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                                 class_labels)
        self._check_condition(sample, controlnet_cond)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        # diffusers' ControlNet passes no encoder_attention_mask to its blocks.
        attn = dict(encoder_hidden_states=encoder_hidden_states,
                    attention_mask=attention_bias(attention_mask, sample.dtype),
                    lora_scale=lora_scale_from(cross_attention_kwargs))

        # 1. time
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype), timestep_cond)  # (B, time_embed_dim)
        if self.class_embedding is not None:
            emb = emb + class_embed(self, class_labels, sample.dtype)
        if self.config.addition_embed_type == "text_time":
            emb = emb + text_time_embed(self, added_cond_kwargs, emb.dtype)

        # 2. in: the latents and the encoded condition, added
        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, h, w)

        # 3. down
        skips = (sample,)
        for block in self.down_blocks:
            if block.has_cross_attention:
                sample, states = block(sample, emb, **attn)
            else:
                sample, states = block(sample, emb, attn["lora_scale"])
            skips += states

        # 4. mid
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, **attn)

        # 5. zero convs, then the scale
        down = [conv(skip) for skip, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(sample)
        if guess_mode and not self.config.global_pool_conditions:
            # log-spaced weights 0.1 -> 1, from the first skip (finest detail) to the mid block
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [residual * scale for residual, scale in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [residual * conditioning_scale for residual in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:  # shuffle-style ControlNets: a global, per-channel residual
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlNetOutput(down, mid)

    def _check_condition(self, sample: torch.Tensor, controlnet_cond: torch.Tensor) -> None:
        factor = 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)
        expected = (sample.shape[0], self.config.conditioning_channels, sample.shape[2] * factor,
                    sample.shape[3] * factor)
        if not torch.is_tensor(controlnet_cond) or tuple(controlnet_cond.shape) != expected:
            got = tuple(controlnet_cond.shape) if torch.is_tensor(controlnet_cond) else type(controlnet_cond).__name__
            raise ValueError(f"controlnet_cond must be (B, conditioning_channels, {factor}h, {factor}w) = {expected} "
                             f"for latents {tuple(sample.shape)}, got {got}")
