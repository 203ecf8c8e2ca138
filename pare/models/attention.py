"""Multi-head attention, the one kernel behind SD's self-, cross- and VAE attention.

diffusers twin: `models/attention_processor.py` (`Attention` with its default `AttnProcessor2_0`).
Source: scaled dot-product attention, Vaswani et al. (arXiv 1706.03762, eq. 1):
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V
and its use for text conditioning in latent diffusion (Rombach et al., arXiv 2112.10752, eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora_scale import lora_call


class Attention(nn.Module):
    """Self-attention (`cross_attention_dim=None`) or cross-attention over `encoder_hidden_states`.

    Inputs are (B, N, C) tokens, or (B, C, H, W) feature maps that are flattened to H*W
    tokens and restored afterwards (the VAE's mid-block attention). `norm_num_groups` adds a
    GroupNorm before the projections, `residual_connection` adds the input back, and the
    result is divided by `rescale_output_factor`, as the VAE's attention block does.

    `upcast_attention` / `upcast_softmax` are recorded but change nothing, exactly as in
    diffusers' default processor on torch >= 2.0: `F.scaled_dot_product_attention` computes
    Q K^T and the softmax in float32 for half-precision inputs in its fused kernels, which is
    what the upcast was introduced for (SD2.1's attention overflowing in fp16 on the older
    explicit `baddbmm` + softmax path). The parity tests hold this claim to the fp16 budget.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        out_dim: int | None = None,
        _from_deprecated_attn_block: bool = False,  # diffusers' weight-renaming flag; nothing to do here
    ):
        super().__init__()
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = out_dim // dim_head if out_dim is not None else heads
        self.is_cross_attention = cross_attention_dim is not None
        self.upcast_attention, self.upcast_softmax = upcast_attention, upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim

        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups else None
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, self.inner_dim, bias=bias)
        # A ModuleList of [Linear, Dropout], so that the weights are named to_out.0.* as in diffusers.
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, out_dim or query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        lora_scale: float = 1.0,
    ) -> torch.Tensor:
        """`attention_mask`: an additive bias broadcastable to (B, heads, N, M), e.g. (B, 1, M) -> unsqueezed.
        `lora_scale`: the LoRA scale of this call, for the projections (`pare.models.lora_scale`)."""
        residual = hidden_states
        is_map = hidden_states.ndim == 4
        if is_map:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # normalise over C
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, M, C_kv)

        batch = hidden_states.shape[0]
        # (B, N, heads*d) -> (B, heads, N, d)
        q = lora_call(self.to_q, hidden_states, lora_scale)
        k = lora_call(self.to_k, context, lora_scale)
        v = lora_call(self.to_v, context, lora_scale)
        q, k, v = (x.view(batch, -1, self.heads, self.inner_dim // self.heads).transpose(1, 2) for x in (q, k, v))
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, context.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, -1, self.inner_dim)  # (B, N, heads*d)
        out = self.to_out[1](lora_call(self.to_out[0], out, lora_scale))

        if is_map:
            out = out.transpose(1, 2).reshape(b, -1, h, w)  # (B, H*W, C) -> (B, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, keys: int) -> torch.Tensor:
        """An additive bias over the M keys: (B, N or 1, M) -> (B, 1, N or 1, M); M must be the keys' count."""
        if attention_mask.shape[-1] != keys:
            # diffusers pads a mask of another length with `keys` zeros (Attention.prepare_attention_mask) and
            # then fails in the kernel; pare says what was expected.
            raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} does not fit {keys} keys: its "
                             f"last dimension must be the number of tokens attended to ({keys})")
        return attention_mask.unsqueeze(1) if attention_mask.ndim == 3 else attention_mask
