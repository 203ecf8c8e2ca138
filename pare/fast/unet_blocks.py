"""The UNet's up blocks on the fast path: their skip concatenations by one copy kernel.

Replaces: `pare/models/unet_2d_blocks.py UpBlock2D.forward` and `CrossAttnUpBlock2D.forward`, with the same loop;
only `torch.cat([hidden_states, skip], dim=1)` becomes `kernels/concat.py cat_channels`, which copies the
channels-last maps at the GPU's bandwidth where PyTorch's cat does not. Same function, to the bit.
"""

from __future__ import annotations

import torch

from ..models.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from .kernels.concat import cat_channels


class FastUpBlock2D(UpBlock2D):
    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, upsample_size: tuple[int, int] | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        for resnet in self.resnets:
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = cat_channels(hidden_states, skip)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W) or upsample_size
        return hidden_states


class FastCrossAttnUpBlock2D(CrossAttnUpBlock2D):
    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor, upsample_size: tuple[int, int] | None = None,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = cat_channels(hidden_states, skip)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb, lora_scale)  # (B, C_out, H, W)
            hidden_states = attn(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                 lora_scale)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W) or upsample_size
        return hidden_states
