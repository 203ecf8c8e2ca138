"""The text-conditioning transformer that sits after each ResNet block of SD's UNet.

diffusers twins: `models/activations.py` (`GEGLU`), `models/attention.py` (`FeedForward`,
`BasicTransformerBlock`) and `models/transformers/transformer_2d.py` (`Transformer2DModel`).
Source: the SpatialTransformer of latent diffusion (Rombach et al., arXiv 2112.10752, section
3.3): flatten the feature map to tokens, run pre-LayerNorm transformer blocks (Vaswani et al.,
arXiv 1706.03762) whose cross-attention reads the text embeddings, unflatten, add the input.

Only the SD path is here: LayerNorm (no AdaNorm variants), a GEGLU feed-forward, continuous
(B, C, H, W) input. Attention masks are additive biases, as `pare.models.attention` takes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .lora_scale import lora_call

FEED_FORWARD_ACTIVATIONS = ("geglu",)


class GEGLU(nn.Module):
    """x -> a * gelu(b), with [a, b] = proj(x) split in halves. diffusers: `models/activations.py GEGLU`.

    Source: Shazeer, "GLU Variants Improve Transformer" (arXiv 2002.05202, eq. 6).
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        hidden_states, gate = lora_call(self.proj, hidden_states, lora_scale).chunk(2, dim=-1)  # (B, N, 2*dim_out) -> 2 x (B, N, dim_out)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU up-projection (dim -> mult*dim), dropout, linear down-projection. diffusers: `models/attention.py FeedForward`.

    The layers sit in a ModuleList so that the weights are named `net.0.proj.*` and `net.2.*`, as in diffusers.
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", inner_dim: int | None = None, bias: bool = True):
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation_fn={activation_fn!r} is not implemented in pare; "
                             f"SD's UNets use one of {FEED_FORWARD_ACTIVATIONS}")
        inner_dim = inner_dim if inner_dim is not None else int(dim * mult)
        self.net = nn.ModuleList([
            GEGLU(dim, inner_dim, bias=bias),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim_out if dim_out is not None else dim, bias=bias),
        ])

    def forward(self, hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        geglu, dropout, out = self.net
        hidden_states = dropout(geglu(hidden_states, lora_scale))
        return lora_call(out, hidden_states, lora_scale)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each added back to its input.

    diffusers: `models/attention.py BasicTransformerBlock` with `norm_type="layer_norm"`.
    Source: the transformer block of Vaswani et al. (arXiv 1706.03762), normalised before each
    sub-layer (Xiong et al., arXiv 2002.04745), as LDM's SpatialTransformer uses it (arXiv 2112.10752).
    `cross_attention_dim=None` leaves out the cross-attention (and its norm2), as diffusers does.
    `only_cross_attention=True` makes the first attention a cross-attention too (the SD2 x4
    upscaler's `disable_self_attentions`): both then read the text.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        attention = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                         upcast_attention=upcast_attention)
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attention)
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, **attention)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        lora_scale: float = 1.0,
    ) -> torch.Tensor:
        """Masks are additive biases: `attention_mask` (B, 1, N) over the keys of the first attention (the
        image tokens; the text with only_cross_attention), `encoder_attention_mask` (B, 1, M) over the text."""
        # hidden_states: (B, N, dim); encoder_hidden_states: (B, M, cross_attention_dim)
        # 1. self-attention over the N image tokens
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), context, attention_mask, lora_scale) + hidden_states
        # 2. cross-attention: image tokens query the text tokens
        if self.attn2 is not None:
            attn = self.attn2(self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask, lora_scale)
            hidden_states = attn + hidden_states
        # 3. feed-forward, token by token
        return self.ff(self.norm3(hidden_states), lora_scale) + hidden_states


class Transformer2DModel(nn.Module):
    """GroupNorm, project in, `num_layers` BasicTransformerBlocks over the H*W tokens, project out, add the input.

    diffusers: `models/transformers/transformer_2d.py Transformer2DModel` (continuous input).
    Source: LDM's SpatialTransformer (Rombach et al., arXiv 2112.10752, section 3.3 and appendix).

    The projections are 1x1 convs on the map (SD 1.x) or, with `use_linear_projection`, Linear
    layers on the tokens (SD 2.x, SDXL): the same map, stored as (out, in, 1, 1) or (out, in).
    SDXL stacks several blocks per stage (`num_layers`, from `transformer_layers_per_block`).
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        if in_channels is None:
            raise ValueError("Transformer2DModel needs in_channels: pare implements the continuous (B, C, H, W) input "
                             "only, not diffusers' vector-quantised or patched inputs")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection

        # eps=1e-6 whatever norm_eps says: diffusers (and LDM's Normalize) hard-code it here.
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, self.inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, self.inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                self.inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, activation_fn=activation_fn, attention_bias=attention_bias,
                upcast_attention=upcast_attention, norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                only_cross_attention=only_cross_attention,
            )
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out = nn.Linear(self.inner_dim, self.out_channels)
        else:
            self.proj_out = nn.Conv2d(self.inner_dim, self.out_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        lora_scale: float = 1.0,
    ) -> torch.Tensor:
        """`encoder_attention_mask`: an additive bias of shape (B, 1, M) over the M text tokens, or None;
        `attention_mask`: one of shape (B, 1, H*W) for the self-attention, or None. `lora_scale`: see lora_scale.py."""
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)

        # 1. project in and flatten: (B, C, H, W) -> (B, H*W, inner_dim)
        if self.use_linear_projection:
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C)
            hidden_states = lora_call(self.proj_in, hidden_states, lora_scale)  # (B, H*W, inner_dim)
        else:
            hidden_states = lora_call(self.proj_in, hidden_states, lora_scale)  # (B, inner_dim, H, W)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, self.inner_dim)

        # 2. the transformer blocks, on tokens
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                  lora_scale)

        # 3. unflatten and project out: (B, H*W, inner_dim) -> (B, C_out, H, W). `.contiguous()` as in
        #    diffusers, so that both libraries hand the same memory layout to the conv (the kernel, and with
        #    it the rounding, depends on the layout).
        if self.use_linear_projection:
            hidden_states = lora_call(self.proj_out, hidden_states, lora_scale)  # (B, H*W, C_out)
            hidden_states = hidden_states.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        else:
            hidden_states = hidden_states.reshape(b, h, w, self.inner_dim).permute(0, 3, 1, 2).contiguous()
            hidden_states = lora_call(self.proj_out, hidden_states, lora_scale)  # (B, C_out, H, W)
        return hidden_states + residual
