"""The UNet's sinusoidal timestep features in one launch.

Replaces: `pare/models/embeddings.py get_timestep_embedding` (diffusers: `models/embeddings.py`), through
`pare/fast/embeddings.py FastTimesteps`: the time features of every UNet call (and SDXL's six size and crop
conditions, through `add_time_proj`). Source: Vaswani et al. (arXiv 1706.03762, section 3.5), as DDPM's
(Ho et al., arXiv 2006.11239) and SD's UNets use it: frequency i of half is w_i = max_period ** (-i / (half - shift)).

Why a kernel: the reference makes its (B, 320) float32 features from 1 to 2 timesteps in about ten launches
(arange, the exponent's multiply and divide, exp, the timesteps' cast, two multiplies, sin, cos, the
concatenation, the flip's), each a few microseconds of a step that the GPU spends mostly waiting on launches.
Here the frequencies are made once per device by the reference's own ops (so they are its values to the bit), and
one kernel computes the angles in the reference's order of rounding, their sines and cosines, and the layout.
"""

from __future__ import annotations

import math

import torch

from . import TRITON, triton_ready

if TRITON:  # at import, not in the call: torch.compile cannot trace an import
    import triton

    from ._timestep_triton import sinusoids as sinusoids_kernel

TRITON_FEATURES = 1  # 0: the reference's ops (the A/B's switch)


def frequencies(half: int, downscale_freq_shift: float, max_period: int, device) -> torch.Tensor:
    """(half,) float32: w_i, by the ops (and so the roundings) of `get_timestep_embedding`."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


def sinusoids(timesteps: torch.Tensor, freqs: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool,
              scale: float) -> torch.Tensor | None:
    """(N,) timesteps (any dtype: cast to float32 in the kernel, as the reference casts them) -> (N, embedding_dim)
    float32 features by the kernel; None where it does not run (no Triton, tensors off the GPU)."""
    if not (TRITON_FEATURES and triton_ready(freqs) and timesteps.ndim == 1 and timesteps.device == freqs.device):
        return None
    n, half = timesteps.shape[0], freqs.shape[0]
    y = torch.empty(n, embedding_dim, dtype=torch.float32, device=timesteps.device)
    sinusoids_kernel[(n,)](timesteps, timesteps.stride(0), freqs, y, float(scale), half, embedding_dim,
                           BLOCK=triton.next_power_of_2(max(half, embedding_dim - 2 * half, 1)), FLIP=flip_sin_to_cos,
                           num_warps=1 if half <= 128 else 4)
    return y
