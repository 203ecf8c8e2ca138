"""Halving and doubling the resolution between UNet and VAE stages.

diffusers twins: `models/downsampling.py` (`Downsample2D`) and `models/upsampling.py` (`Upsample2D`).
Source: the DDPM UNet (Ho et al., arXiv 2006.11239), after PixelCNN++ (arXiv 1701.05517).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv (or a 2x2 average pool when `use_conv=False`).

    `padding=0` pads right and bottom by one before the conv, as the original LDM VAE
    encoder does (arXiv 2112.10752; `downsample_padding=0` in its config): for even sizes the
    output is the same size as with symmetric padding, but the receptive field is shifted.
    Only diffusers' `name="conv"`/`"op"` layout (`self.conv`) exists here: it is the one SD
    checkpoints use. (With `name="conv"` diffusers also registers the same module as
    `Conv2d_0`, a legacy alias that SD's UNet and VAE, built with `name="op"`, never have.)
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1,
                 name: str = "conv", kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv, self.padding = use_conv, padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size, stride=2, padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError(f"average-pool downsampling keeps the channels: got {channels} -> {self.out_channels}")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Downsample2D expects {self.channels} channels, got input of shape {tuple(hidden_states.shape)}")
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(hidden_states)  # (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then (with `use_conv`) a 3x3 conv.

    `output_size` forces the size instead of 2x: the UNet passes it when the skip connection
    it will be concatenated with has an odd size (latents not divisible by 2**stages).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, name: str = "conv",
                 kernel_size: int = 3, padding: int = 1, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size, padding=padding, bias=bias) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Upsample2D expects {self.channels} channels, got input of shape {tuple(hidden_states.shape)}")
        if hidden_states.shape[0] >= 64:
            # upsample_nearest2d fails on large non-contiguous batches: https://github.com/huggingface/diffusers/issues/984
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states) if self.conv is not None else hidden_states
