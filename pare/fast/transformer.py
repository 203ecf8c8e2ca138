"""The UNet's transformer on the fast path: channels last in and out, no layout copies; a fused GEGLU.

Replaces: `pare/models/transformer.py Transformer2DModel.forward` and `GEGLU.forward`.

The reference flattens a map to tokens with a permute (free) and restores it with
`.contiguous()` in NCHW, as diffusers does: on a channels-last UNet that copy, and the ones
PyTorch's GroupNorm makes, are pure traffic. Here the map stays channels last, so (B, C, H, W)
-> (B, H*W, C) and back are views, and the 1x1 projections run as convs on the channels-last
map (cuDNN makes them one GEMM; LoRA hooks on them still fire).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.lora_scale import lora_call
from ..models.transformer import GEGLU, Transformer2DModel
from .kernels.geglu import geglu
from .kernels.group_norm import add_bias_residual, group_norm
from .resnet import plain


class FastGEGLU(GEGLU):
    def forward(self, hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        return geglu(lora_call(self.proj, hidden_states, lora_scale))  # (B, N, 2*inner) -> (B, N, inner)


class FastTransformer2DModel(Transformer2DModel):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        n = self.norm
        hidden_states = group_norm(hidden_states, n.num_groups, n.weight, n.bias, n.eps)  # (B, C, H, W)

        # 1. project in and flatten: (B, C, H, W) -> (B, H*W, inner_dim)
        if self.use_linear_projection:
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view if channels last
            hidden_states = lora_call(self.proj_in, hidden_states, lora_scale)
        else:
            hidden_states = lora_call(self.proj_in, hidden_states, lora_scale)  # (B, inner_dim, H, W)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, self.inner_dim)

        # 2. the transformer blocks, on tokens
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                  lora_scale)

        # 3. unflatten (a channels-last view) and project out; its bias joins the residual add (one pass)
        out = self.proj_out
        direct = plain(out) and out.bias is not None
        if self.use_linear_projection:
            hidden_states = F.linear(hidden_states, out.weight) if direct else lora_call(out, hidden_states, lora_scale)
            hidden_states = hidden_states.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)
        else:
            hidden_states = hidden_states.reshape(b, h, w, self.inner_dim).permute(0, 3, 1, 2)
            hidden_states = (out._conv_forward(hidden_states, out.weight, None) if direct
                             else lora_call(out, hidden_states, lora_scale))  # (B, C_out, H, W)
        return add_bias_residual(hidden_states, residual, out.bias) if direct else hidden_states + residual
