"""GroupNorm on the fast path: the Triton kernel on channels-last CUDA maps, `nn.GroupNorm` otherwise.

Replaces: `nn.GroupNorm.forward` wherever it stands alone (conv_norm_out, the transformers' and the
VAE attention's norms go through `group_norm` directly). Same module, same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.group_norm import group_norm


class FastGroupNorm(nn.GroupNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.GroupNorm's argument name)
        if input.ndim != 4:
            return super().forward(input)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
