"""Timesteps on the fast path: the sinusoidal features in one kernel, their frequencies made once.

Replaces: `pare/models/embeddings.py Timesteps.forward` (diffusers: `models/embeddings.py Timesteps`) with the
same function: the frequencies by the reference's ops, the angles in its order of rounding (see
`kernels/timestep.py`), float32 out as the reference's. Elsewhere (the CPU, no Triton) the reference runs.
"""

from __future__ import annotations

import torch

from ..models.embeddings import Timesteps
from .kernels.timestep import frequencies, sinusoids

MAX_PERIOD = 10000  # `get_timestep_embedding`'s default, which `Timesteps` uses


class FastTimesteps(Timesteps):
    def freqs(self, device: torch.device) -> torch.Tensor:
        """The (half,) frequencies on `device`, made once there (not inside a CUDA graph capture, whose memory a
        later eager call must not read: there they are made in the graph)."""
        half = self.num_channels // 2
        cached = self.__dict__.get("_freqs")
        if cached is not None and cached.device == device:
            return cached
        freqs = frequencies(half, self.downscale_freq_shift, MAX_PERIOD, device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.__dict__["_freqs"] = freqs
        return freqs

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim == 1:  # else the reference's error
            out = sinusoids(timesteps, self.freqs(timesteps.device), self.num_channels, self.flip_sin_to_cos,
                            self.scale)
            if out is not None:
                return out
        return super().forward(timesteps)
