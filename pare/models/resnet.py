"""The residual block of every SD UNet and VAE stage.

diffusers twin: `models/resnet.py` (`ResnetBlock2D`).
Source: the ResNet block of DDPM (Ho et al., arXiv 2006.11239, appendix B), itself the
pre-activation ResNet of He et al. (arXiv 1603.05027) with GroupNorm (Wu & He, arXiv
1803.08494) and the timestep embedding added between the two convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation
from .lora_scale import lora_call

TIME_EMBEDDING_NORMS = ("default", "scale_shift")


class ResnetBlock2D(nn.Module):
    """norm -> act -> conv -> (+ time embedding) -> norm -> act -> dropout -> conv, plus a shortcut.

    `time_embedding_norm="default"` adds the projected embedding to the features;
    `"scale_shift"` applies it as a FiLM after norm2: h * (1 + scale) + shift
    (Perez et al., arXiv 1709.07871; used by improved DDPM, arXiv 2102.09672).
    `temb_channels=None` drops the embedding (the VAE's blocks).

    The diffusers options for other UNet families (`up`, `down`, `kernel`, `pre_norm=False`) are
    not here: no SD checkpoint uses them. Like diffusers, the shortcut is a 1x1 conv whenever
    the channel count changes, whatever `conv_shortcut` says.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: int | None = None,
    ):
        super().__init__()
        if time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"unknown time_embedding_norm {time_embedding_norm!r}; expected one of {TIME_EMBEDDING_NORMS}")
        out_channels = out_channels or in_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None and time_embedding_norm == "scale_shift":
            raise ValueError("time_embedding_norm='scale_shift' needs temb_channels: it is a FiLM by the time embedding")
        self.time_emb_proj = None
        if temb_channels is not None:
            # scale_shift needs a scale and a shift per channel, hence twice the outputs.
            factor = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, factor * out_channels)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        if use_in_shortcut is None:
            use_in_shortcut = in_channels != conv_2d_out_channels
        self.conv_shortcut = None
        if use_in_shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        # input_tensor: (B, C_in, H, W); temb: (B, temb_channels) or None; lora_scale: see lora_scale.py
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        hidden_states = lora_call(self.conv1, hidden_states, lora_scale)  # (B, C_out, H, W)

        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D has temb_channels set, so forward() needs a time embedding `temb`")
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = lora_call(self.time_emb_proj, temb, lora_scale)[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)

        if self.time_embedding_norm == "scale_shift":
            scale, shift = temb.chunk(2, dim=1)  # (B, C_out, 1, 1) each
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        else:
            if self.time_emb_proj is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)

        hidden_states = lora_call(self.conv2, self.dropout(self.nonlinearity(hidden_states)), lora_scale)
        if self.conv_shortcut is not None:
            input_tensor = lora_call(self.conv_shortcut, input_tensor, lora_scale)
        return (input_tensor + hidden_states) / self.output_scale_factor
