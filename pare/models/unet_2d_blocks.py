"""The stages of SD's UNet: ResNet blocks, optionally each followed by a text transformer, then a resample.

diffusers twin: `models/unets/unet_2d_blocks.py` (`CrossAttnDownBlock2D`, `DownBlock2D`,
`UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`, and the factories
`get_down_block`, `get_mid_block`, `get_up_block`).
Source: the UNet of DDPM (Ho et al., arXiv 2006.11239, appendix B), itself after Ronneberger et
al. (arXiv 1505.04597), with LDM's cross-attention transformers (Rombach et al., arXiv 2112.10752).

These five are all the block types of SD 1.x, SD 2.x and SDXL. A down block returns its output
and every intermediate state (the skip connections); an up block pops one skip per ResNet,
last in first out, and concatenates it on the channel axis.

Heads: like diffusers, a block is given `num_attention_heads` and splits its channels between
them (head dim = out_channels // heads). Which config key holds the heads is the UNet's quirk,
explained in `unet_2d_condition.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from .resampling import Downsample2D, Upsample2D
from .resnet import ResnetBlock2D
from .transformer import Transformer2DModel


def _resnet(in_channels, out_channels, temb_channels, eps, groups, dropout, time_embedding_norm, act_fn,
            output_scale_factor):
    return ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, eps=eps,
                         groups=groups, dropout=dropout, time_embedding_norm=time_embedding_norm,
                         non_linearity=act_fn, output_scale_factor=output_scale_factor)


def _per_layer(transformer_layers_per_block: int | list[int], num_layers: int) -> list[int]:
    """`transformer_layers_per_block` is one count for the whole block or one per ResNet layer."""
    if isinstance(transformer_layers_per_block, int):
        return [transformer_layers_per_block] * num_layers
    return list(transformer_layers_per_block)


class DownBlock2D(nn.Module):
    """`num_layers` ResNets, then a stride-2 conv. diffusers: `models/unets/unet_2d_blocks.py DownBlock2D`."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_eps, resnet_groups,
                    dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)
            for i in range(num_layers)
        ])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                            padding=downsample_padding, name="op")])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, lora_scale: float = 1.0,
                additional_residuals: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`additional_residuals`: a T2I-Adapter feature map, added to the block's output."""
        output_states = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, ceil(H/2), ceil(W/2))
            output_states += (hidden_states,)
        if additional_residuals is not None:
            # diffusers adds it in place to the output, which is also the last skip: both get it.
            hidden_states = hidden_states + additional_residuals
            output_states = output_states[:-1] + (hidden_states,)
        return hidden_states, output_states


class CrossAttnDownBlock2D(nn.Module):
    """`num_layers` x (ResNet, Transformer2DModel), then a stride-2 conv.

    diffusers: `models/unets/unet_2d_blocks.py CrossAttnDownBlock2D`.
    """

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | list[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 downsample_padding: int = 1, add_downsample: bool = True, use_linear_projection: bool = False,
                 upcast_attention: bool = False, only_cross_attention: bool = False):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList([
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_eps, resnet_groups,
                    dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)
            for i in range(num_layers)
        ])
        # No dropout for the transformers: diffusers does not pass the UNet's `dropout` on to them.
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, in_channels=out_channels,
                               num_layers=layers[i], cross_attention_dim=cross_attention_dim,
                               norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention, only_cross_attention=only_cross_attention)
            for i in range(num_layers)
        ])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                            padding=downsample_padding, name="op")])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0, additional_residuals: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Masks: additive biases (see Transformer2DModel). `additional_residuals`: a T2I-Adapter feature
        map, added after the last transformer (before the downsampler), as diffusers does."""
        output_states = ()
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
            hidden_states = attn(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                 lora_scale)
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, ceil(H/2), ceil(W/2))
            output_states += (hidden_states,)
        return hidden_states, output_states


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResNet, then `num_layers` x (Transformer2DModel, ResNet), at the lowest resolution.

    diffusers: `models/unets/unet_2d_blocks.py UNetMidBlock2DCrossAttn`.
    """

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | list[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 use_linear_projection: bool = False, upcast_attention: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        layers = _per_layer(transformer_layers_per_block, num_layers)
        resnet = dict(temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
                      time_embedding_norm=resnet_time_scale_shift, act_fn=resnet_act_fn,
                      output_scale_factor=output_scale_factor)
        self.resnets = nn.ModuleList([_resnet(in_channels, out_channels, **resnet)]
                                     + [_resnet(out_channels, out_channels, **resnet) for _ in range(num_layers)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, in_channels=out_channels,
                               num_layers=layers[i], cross_attention_dim=cross_attention_dim,
                               norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention)
            for i in range(num_layers)
        ])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb, lora_scale)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                 lora_scale)
            hidden_states = resnet(hidden_states, temb, lora_scale)
        return hidden_states


def _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, **resnet) -> nn.ModuleList:
    """ResNet i reads [previous output, skip i] concatenated on channels.

    The skips come from the mirrored down stage, popped last first: all but the last have that
    stage's out_channels, the last one (the stage's input) has `in_channels`.
    """
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in_channels = prev_output_channel if i == 0 else out_channels
        resnets.append(_resnet(resnet_in_channels + skip_channels, out_channels, **resnet))
    return nn.ModuleList(resnets)


class UpBlock2D(nn.Module):
    """`num_layers` ResNets, each on [hidden, skip], then 2x nearest upsampling and a conv.

    diffusers: `models/unets/unet_2d_blocks.py UpBlock2D`.
    """

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0, add_upsample: bool = True):
        super().__init__()
        self.resolution_idx = resolution_idx  # diffusers keeps it for FreeU, which pare does not implement
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers,
                                   temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
                                   time_embedding_norm=resnet_time_scale_shift, act_fn=resnet_act_fn,
                                   output_scale_factor=output_scale_factor)
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, upsample_size: tuple[int, int] | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        for resnet in self.resnets:
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W) or upsample_size
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """`num_layers` x (ResNet on [hidden, skip], Transformer2DModel), then upsampling.

    diffusers: `models/unets/unet_2d_blocks.py CrossAttnUpBlock2D`.
    """

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | list[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, use_linear_projection: bool = False, upcast_attention: bool = False,
                 only_cross_attention: bool = False):
        super().__init__()
        self.resolution_idx = resolution_idx  # diffusers keeps it for FreeU, which pare does not implement
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers,
                                   temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
                                   time_embedding_norm=resnet_time_scale_shift, act_fn=resnet_act_fn,
                                   output_scale_factor=output_scale_factor)
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, in_channels=out_channels,
                               num_layers=layers[i], cross_attention_dim=cross_attention_dim,
                               norm_num_groups=resnet_groups, use_linear_projection=use_linear_projection,
                               upcast_attention=upcast_attention, only_cross_attention=only_cross_attention)
            for i in range(num_layers)
        ])
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor, upsample_size: tuple[int, int] | None = None,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
            hidden_states = attn(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                 lora_scale)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W) or upsample_size
        return hidden_states


# The block types pare implements, by the names a UNet config uses. Every factory branches on these dicts.
DOWN_BLOCKS = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}
UP_BLOCKS = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}


def _lookup(kind: str, key: str, name: str, blocks: dict) -> type:
    # diffusers still reads the names of its first release, "UNetResDownBlock2D" and the like.
    name = name[len("UNetRes"):] if name.startswith("UNetRes") else name
    if name not in blocks:
        raise ValueError(
            f"{key} names a {kind} block {name!r}, which pare does not implement: pare has the blocks of SD 1.x, "
            f"SD 2.x and SDXL, {tuple(blocks)}. diffusers' other UNet blocks (for other model families) are not ported."
        )
    return blocks[name]


def get_down_block(down_block_type: str, *, cross_attention: dict, **kwargs) -> nn.Module:
    """Build a down block by its config name; `cross_attention` holds the arguments only cross-attention blocks take."""
    block = _lookup("down", "down_block_types", down_block_type, DOWN_BLOCKS)
    return block(**kwargs, **(cross_attention if block.has_cross_attention else {}))


def get_mid_block(mid_block_type: str | None, *, cross_attention: dict, **kwargs) -> nn.Module | None:
    """Build the mid block by its config name; `None` means no mid block, as in diffusers."""
    if mid_block_type is None:
        return None
    block = _lookup("mid", "mid_block_type", mid_block_type, MID_BLOCKS)
    return block(**kwargs, **(cross_attention if block.has_cross_attention else {}))


def get_up_block(up_block_type: str, *, cross_attention: dict, **kwargs) -> nn.Module:
    """Build an up block by its config name; `cross_attention` holds the arguments only cross-attention blocks take."""
    block = _lookup("up", "up_block_types", up_block_type, UP_BLOCKS)
    return block(**kwargs, **(cross_attention if block.has_cross_attention else {}))
