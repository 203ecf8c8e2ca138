"""The VAE's two halves and the Gaussian it encodes an image into.

diffusers twin: `models/autoencoders/vae.py` (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`).
Source: the KL-regularised autoencoder of latent diffusion (Rombach et al., arXiv 2112.10752,
sec. 3 and appendix G), a VAE in the sense of Kingma & Welling (arXiv 1312.6114).

    image (B, 3, H, W) --Encoder--> moments (B, 2*latent, H/f, W/f) --> N(mean, var)
    latent (B, latent, H/f, W/f) --Decoder--> image (B, 3, H, W)

with f = 2 ** (number of stages - 1): 8 for every SD VAE.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .vae_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

# The block types pare builds, by the names diffusers' configs use. diffusers' `get_down_block` /
# `get_up_block` know more (AttnDownEncoderBlock2D, ...), but no SD checkpoint uses them.
DOWN_BLOCKS = {"DownEncoderBlock2D": DownEncoderBlock2D}
UP_BLOCKS = {"UpDecoderBlock2D": UpDecoderBlock2D}


def _check_block_types(kind: str, block_types: Sequence[str], supported: dict, block_out_channels: Sequence[int]):
    for name in block_types:
        if name not in supported:
            raise ValueError(f"unknown {kind} {name!r}; pare's VAE supports {tuple(supported)}")
    if len(block_types) != len(block_out_channels):
        raise ValueError(f"{kind}s {list(block_types)} and block_out_channels {list(block_out_channels)} "
                         "must have the same length: one stage per entry")


class Encoder(nn.Module):
    """conv_in -> down stages (each halving H, W but the last) -> mid block -> norm, SiLU, conv_out.

    `double_z=True` outputs 2 * `out_channels` maps: the mean and log-variance of the latent.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_block_types("down_block_type", down_block_types, DOWN_BLOCKS, block_out_channels)
        self.layers_per_block = layers_per_block
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)

        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(DOWN_BLOCKS[block_type](
                in_channels=input_channel,
                out_channels=output_channel,
                num_layers=layers_per_block,
                resnet_eps=1e-6,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                add_downsample=i < len(block_out_channels) - 1,
                downsample_padding=0,  # LDM's asymmetric padding, see Downsample2D
            ))

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            output_scale_factor=1,
            attention_head_dim=block_out_channels[-1],  # one head
            resnet_groups=norm_num_groups,
            temb_channels=None,
            add_attention=mid_block_add_attention,
        )

        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[-1], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()  # SiLU whatever `act_fn` says, as in diffusers and LDM
        conv_out_channels = 2 * out_channels if double_z else out_channels
        self.conv_out = nn.Conv2d(block_out_channels[-1], conv_out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C_img, H, W) -> (B, C_0, H, W)
        for down_block in self.down_blocks:
            sample = down_block(sample)  # -> (B, C_last, H/f, W/f) after the last stage
        sample = self.mid_block(sample)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 2*latent, H/f, W/f)
        return sample


class Decoder(nn.Module):
    """conv_in -> mid block -> up stages (each doubling H, W but the last) -> norm, SiLU, conv_out.

    The up stages mirror the encoder's channels in reverse with one more ResNet each
    (`layers_per_block + 1`), as in LDM's decoder.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_block_types("up_block_type", up_block_types, UP_BLOCKS, block_out_channels)
        self.layers_per_block = layers_per_block
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            output_scale_factor=1,
            attention_head_dim=block_out_channels[-1],  # one head
            resnet_groups=norm_num_groups,
            temb_channels=None,
            add_attention=mid_block_add_attention,
        )

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(UP_BLOCKS[block_type](
                in_channels=prev_output_channel,
                out_channels=output_channel,
                num_layers=layers_per_block + 1,
                resnet_eps=1e-6,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                add_upsample=i < len(block_out_channels) - 1,
                temb_channels=None,
            ))

        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()  # SiLU whatever `act_fn` says, as in diffusers and LDM
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, latent, h, w) -> (B, C_last, h, w)
        sample = self.mid_block(sample)
        for up_block in self.up_blocks:
            sample = up_block(sample)  # -> (B, C_0, h*f, w*f) after the last stage
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, C_img, h*f, w*f)
        return sample


class DiagonalGaussianDistribution:
    """N(mean, diag(var)) per latent element, from the encoder's moments (mean and log-variance stacked on C).

    `sample(generator)` is the reparameterisation trick, z = mean + std * eps (Kingma & Welling,
    arXiv 1312.6114, sec. 2.4); `kl()` is KL(q || N(0, I)), their appendix B, summed per image.
    `deterministic=True` collapses it to its mean (std = var = 0), as diffusers' flag does.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # (B, 2L, h, w) -> 2 x (B, L, h, w)
        # As in LDM and diffusers: keeps exp() finite and var > 0 for any encoder output.
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I) drawn exactly as diffusers' `randn_tensor` draws it."""
        eps = randn_like_diffusers(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per image, shape (B,); `other=None` means the standard normal prior."""
        if self.deterministic:
            # diffusers returns torch.Tensor([0.0]) on the CPU here; pare keeps the batch shape and device.
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mean, var), summed over `dims`."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


def randn_like_diffusers(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise that equals diffusers' `utils/torch_utils.py randn_tensor` draw for draw.

    A CPU generator draws on the CPU and the result moves to `device` (so a seed gives the same
    noise on every device); a list of generators draws one batch element each.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per image, or one")
        return torch.cat([randn_like_diffusers((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {generator.device} generator; use a CPU generator "
                             f"or one on {device}")
        draw_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
