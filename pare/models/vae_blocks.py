"""The three stages the VAE's encoder and decoder are stacked from.

diffusers twins: `models/unets/unet_2d_blocks.py` (`DownEncoderBlock2D`, `UpDecoderBlock2D`,
`UNetMidBlock2D`). diffusers keeps them beside the UNet's blocks; pare keeps them here, beside
the VAE that uses them, and shares the ResNet, resampling and attention layers with the UNet.
Source: the autoencoder of latent diffusion (Rombach et al., arXiv 2112.10752, appendix G),
whose stages are the DDPM UNet's without the timestep (Ho et al., arXiv 2006.11239).

Only the path SD's VAEs take is here. Not ported: `resnet_time_scale_shift="spatial"` (the
SpatialNorm of MoVQ, arXiv 2209.09002; no SD checkpoint uses it) and `resnet_pre_norm` (which
diffusers' own ResnetBlock2D ignores: it always pre-normalises).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .resampling import Downsample2D, Upsample2D
from .resnet import ResnetBlock2D


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks, then a stride-2 conv that halves H and W (unless the last stage).

    The VAE encoder passes `downsample_padding=0`: pad right and bottom only, as the original
    LDM encoder does (see `Downsample2D`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                temb_channels=None,
                eps=resnet_eps,
                groups=resnet_groups,
                dropout=dropout,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
            )
            for i in range(num_layers)
        )
        # A one-element ModuleList, so that the weights are named downsamplers.0.conv.* as in diffusers.
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding,
                              name="op")]
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)  # (B, C_in, H, W) -> (B, C_out, H, W)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, H, W) -> (B, C_out, H/2, W/2)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResNet blocks, then nearest 2x upsampling and a conv (unless the last stage).

    `temb_channels` is diffusers' option for UNet-style decoders; SD's decoder leaves it None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        temb_channels: int | None = None,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx  # the stage's index, kept as diffusers does (FreeU reads it)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                temb_channels=temb_channels,
                eps=resnet_eps,
                groups=resnet_groups,
                dropout=dropout,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
            )
            for i in range(num_layers)
        )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)  # (B, C_in, H, W) -> (B, C_out, H, W)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C_out, H, W) -> (B, C_out, 2H, 2W)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """ResNet, then `num_layers` x (self-attention over all H*W positions, ResNet), at constant shape.

    The attention is the VAE's "AttnBlock" of LDM: GroupNorm, one head as wide as the channels
    (`attention_head_dim=in_channels` from the Encoder and Decoder), the input added back.
    It is the only place where the VAE mixes information across the whole image; without it
    (`add_attention=False`, `mid_block_add_attention` in the config) the block is all ResNets.
    """

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attn_groups: int | None = None,
        add_attention: bool = True,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.add_attention = add_attention
        attn_groups = attn_groups if attn_groups is not None else resnet_groups
        # diffusers warns and falls back to one head over all channels; so does pare, silently.
        attention_head_dim = attention_head_dim if attention_head_dim is not None else in_channels

        def resnet():
            return ResnetBlock2D(in_channels=in_channels, out_channels=in_channels, temb_channels=temb_channels,
                                 eps=resnet_eps, groups=resnet_groups, dropout=dropout, non_linearity=resnet_act_fn,
                                 output_scale_factor=output_scale_factor)

        def attention():
            return Attention(in_channels, heads=in_channels // attention_head_dim, dim_head=attention_head_dim,
                             rescale_output_factor=output_scale_factor, eps=resnet_eps, norm_num_groups=attn_groups,
                             residual_connection=True, bias=True, upcast_softmax=True,
                             _from_deprecated_attn_block=True)

        self.resnets = nn.ModuleList([resnet()] + [resnet() for _ in range(num_layers)])
        # Without attention diffusers keeps a list of Nones, so the layer count still reads off `attentions`.
        self.attentions = nn.ModuleList([attention() if add_attention else None for _ in range(num_layers)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C, H, W) throughout
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states
