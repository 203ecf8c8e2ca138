"""The UNet's transformer on the fast path: channels last in and out, no layout copies; a fused GEGLU;
the blocks' residual adds fused into the LayerNorms that follow them.

Replaces: `pare/models/transformer.py Transformer2DModel.forward`, `BasicTransformerBlock.forward`
and `GEGLU.forward`.

The reference flattens a map to tokens with a permute (free) and restores it with
`.contiguous()` in NCHW, as diffusers does: on a channels-last UNet that copy, and the ones
PyTorch's GroupNorm makes, are pure traffic. Here the map stays channels last, so (B, C, H, W)
-> (B, H*W, C) and back are views, and the 1x1 projections run as convs on the channels-last
map (cuDNN makes them one GEMM; LoRA hooks on them still fire).

In a block, each sub-layer adds its output to the residual stream, and the next sub-layer
normalises the sum. The reference adds in a pass of its own and the LayerNorm reads the sum back;
here one kernel does both (`kernels/layer_norm.py`), rounding the sum as the reference does: one
pass and one launch fewer for each of the two adds followed by a norm.

Tried first: the LayerNorm kernel also wrote x + b_out, and the projection's GEMM accumulated into
it (`addmm_`, beta = 1), which saved the third add too; but the residual stream was rounded twice
(x + b, then the sum), and each block's error against float64 came out 1.35x diffusers' (within the
budget only thanks to its floor; benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.lora_scale import lora_call
from ..models.transformer import GEGLU, BasicTransformerBlock, Transformer2DModel
from .attention import FastAttention
from .kernels.geglu import geglu
from .kernels.group_norm import add_bias_residual, group_norm
from .kernels.layer_norm import layer_norm
from .resnet import plain


class FastGEGLU(GEGLU):
    def forward(self, hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        return geglu(lora_call(self.proj, hidden_states, lora_scale))  # (B, N, 2*inner) -> (B, N, inner)


class FastBasicTransformerBlock(BasicTransformerBlock):
    def _fusable(self) -> bool:
        """The SD block with affine norms that carry no hooks, and no dropout: the fused adds apply."""
        attns = [a for a in (self.attn1, self.attn2) if a is not None]
        norms = [n for n in (self.norm1, self.norm2, self.norm3) if n is not None]
        dropouts = [a.to_out[1] for a in attns] + [self.ff.net[1]]
        return (all(isinstance(a, FastAttention) and not a.residual_connection and a.rescale_output_factor == 1.0
                    for a in attns)
                and all(plain(n) and n.weight is not None and n.bias is not None for n in norms)
                and not any(d.p > 0 and d.training for d in dropouts))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0) -> torch.Tensor:
        if hidden_states.ndim != 3 or not self._fusable():
            return super().forward(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask,
                                   lora_scale)
        # hidden_states: (B, N, dim). Each residual add is done by the kernel of the norm that follows it.
        def project(attn, y, context, mask):  # the output projection, as a module: LoRA hooks on it fire
            return attn.to_out[1](lora_call(attn.to_out[0], attn.attend(y, context, mask, lora_scale), lora_scale))

        # 1. self-attention over the image tokens (over the text with only_cross_attention)
        context = encoder_hidden_states if self.only_cross_attention else None
        n = self.norm1
        h, y = layer_norm(hidden_states, n.weight, n.bias, n.eps)
        out = project(self.attn1, y, context, attention_mask)
        # 2. cross-attention: image tokens query the text tokens; h = out + h and its norm in one kernel
        if self.attn2 is not None:
            n = self.norm2
            h, y = layer_norm(out, n.weight, n.bias, n.eps, residual=h)
            out = project(self.attn2, y, encoder_hidden_states, encoder_attention_mask)
        # 3. feed-forward (its GEGLU gate in one kernel)
        n = self.norm3
        h, y = layer_norm(out, n.weight, n.bias, n.eps, residual=h)
        return self.ff(y, lora_scale) + h


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
