"""ResnetBlock2D on the fast path: GroupNorm + SiLU (and the time-embedding add) in one kernel each.

Replaces: `pare/models/resnet.py ResnetBlock2D.forward`, for the SD path: SiLU, the "default"
time-embedding norm (the embedding is added before norm2), no dropout at inference. The block
computes the same function with the same weights; the other configurations run the reference.

Per block that saves, on a (B, C, H, W) map, the SiLU passes (2 reads and 2 writes of the map),
the time-embedding add (1 read, 1 write) and, on channels-last maps, the layout copies around
PyTorch's NCHW GroupNorm (see `kernels/group_norm.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lora_scale import lora_call
from ..models.resnet import ResnetBlock2D
from .kernels.group_norm import group_norm


class FastResnetBlock2D(ResnetBlock2D):
    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        dropout = self.dropout.p > 0 and self.training
        if (not isinstance(self.nonlinearity, nn.SiLU) or self.time_embedding_norm != "default" or dropout
                or (self.time_emb_proj is not None and temb is None)):
            return super().forward(input_tensor, temb, lora_scale)
        n1, n2 = self.norm1, self.norm2
        hidden_states = group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, silu=True)
        hidden_states = lora_call(self.conv1, hidden_states, lora_scale)  # (B, C_out, H, W)
        add = None
        if self.time_emb_proj is not None:
            add = lora_call(self.time_emb_proj, temb if self.skip_time_act else F.silu(temb), lora_scale)  # (B, C_out)
        # norm2(h + temb) -> SiLU in one pass; dropout is the identity at inference
        hidden_states = group_norm(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, add=add, silu=True)
        hidden_states = lora_call(self.conv2, hidden_states, lora_scale)
        if self.conv_shortcut is not None:
            input_tensor = lora_call(self.conv_shortcut, input_tensor, lora_scale)
        out = input_tensor + hidden_states
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor
