"""ResnetBlock2D on the fast path: GroupNorm + SiLU (and the time-embedding add) in one kernel each.

Replaces: `pare/models/resnet.py ResnetBlock2D.forward`, for the SD path: SiLU, the "default"
time-embedding norm (the embedding is added before norm2), no dropout at inference. The block
computes the same function with the same weights; the other configurations run the reference.

Per block that saves, on a (B, C, H, W) map, the SiLU passes (2 reads and 2 writes of the map),
the time-embedding add (1 read, 1 write), on channels-last maps the layout copies around
PyTorch's NCHW GroupNorm (see `kernels/group_norm.py`), and the two conv-bias passes that
PyTorch runs after cuDNN's convolution (`output.add_(bias)`, 1 read and 1 write each): conv1's
bias joins norm2's per-channel add, conv2's the residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lora_scale import lora_call
from ..models.resnet import ResnetBlock2D
from .kernels.group_norm import add_bias_residual, group_norm


def plain(module: nn.Module | None) -> bool:
    """No LoRA on it (no forward hooks, no scale-taking wrapper): its weights and bias may be used directly."""
    return module is None or not (module._forward_hooks or module._forward_pre_hooks
                                  or getattr(module, "takes_lora_scale", False))


class FastResnetBlock2D(ResnetBlock2D):
    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        dropout = self.dropout.p > 0 and self.training
        if (not isinstance(self.nonlinearity, nn.SiLU) or self.time_embedding_norm != "default" or dropout
                or (self.time_emb_proj is not None and temb is None)):
            return super().forward(input_tensor, temb, lora_scale)
        n1, n2 = self.norm1, self.norm2
        # The convs' biases join the kernels' adds (the GroupNorm's add, the residual add) unless a LoRA owns the conv.
        direct = (self.output_scale_factor == 1.0 and all(plain(m) for m in (self.conv1, self.conv2, self.conv_shortcut))
                  and self.conv1.bias is not None)
        hidden_states = group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, silu=True)
        add = None
        bank = self.__dict__.get("_time_projections")  # time_projections.py: all blocks' projections in one GEMM
        if self.time_emb_proj is not None and bank is not None and plain(self.time_emb_proj):
            add = bank.project(self.time_emb_proj, temb, lora_scale)  # (B, C_out)
        elif self.time_emb_proj is not None:
            add = lora_call(self.time_emb_proj, temb if self.skip_time_act else F.silu(temb), lora_scale)  # (B, C_out)
        if direct:
            hidden_states = self.conv1._conv_forward(hidden_states, self.conv1.weight, None)  # (B, C_out, H, W)
        else:
            hidden_states = lora_call(self.conv1, hidden_states, lora_scale)
        # norm2(h + bias1 + temb) -> SiLU in one pass (the kernel reads both adds as they are); dropout is the
        # identity at inference
        hidden_states = group_norm(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, add=add, silu=True,
                                   channel_add=self.conv1.bias if direct else None)
        if direct:
            hidden_states = self.conv2._conv_forward(hidden_states, self.conv2.weight, None)
            shortcut, shortcut_bias = input_tensor, None
            if self.conv_shortcut is not None:
                shortcut = self.conv_shortcut._conv_forward(input_tensor, self.conv_shortcut.weight, None)
                shortcut_bias = self.conv_shortcut.bias
            return add_bias_residual(hidden_states, shortcut, self.conv2.bias, shortcut_bias)  # one pass
        hidden_states = lora_call(self.conv2, hidden_states, lora_scale)
        if self.conv_shortcut is not None:
            input_tensor = lora_call(self.conv_shortcut, input_tensor, lora_scale)
        out = input_tensor + hidden_states
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor
