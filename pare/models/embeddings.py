"""Timestep embeddings: the sinusoidal features of the diffusion step, then an MLP.

diffusers twin: `models/embeddings.py` (`get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).
Sources: the sinusoidal position encoding of Vaswani et al. (arXiv 1706.03762, section 3.5),
used for the noise level by DDPM (Ho et al., arXiv 2006.11239, appendix B).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import get_activation


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal features of shape (N, embedding_dim) for N (possibly fractional) timesteps.

    Frequency i of half = embedding_dim // 2 is  w_i = max_period ** (-i / (half - downscale_freq_shift)),
    and the features are [sin(t w), cos(t w)] (or [cos, sin] with flip_sin_to_cos, as SD's UNets use).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor of shape (N,), got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    # Computed in float32 whatever the model dtype: t * w reaches 1000 and fp16 would lose the phase.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    angles = scale * timesteps[:, None].float() * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # odd sizes get one zero feature
    return emb


class Timesteps(nn.Module):
    """The parameter-free sinusoidal features. diffusers: `models/embeddings.py Timesteps`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: int = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class TimestepEmbedding(nn.Module):
    """Linear -> act -> Linear on the sinusoidal features. diffusers: `models/embeddings.py TimestepEmbedding`.

    `cond_proj_dim` adds a bias-free projection of a guidance embedding to the input, as
    LCM-distilled UNets use (`time_cond_proj_dim`; Luo et al., arXiv 2310.04378).
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample
