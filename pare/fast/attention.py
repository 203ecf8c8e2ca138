"""Attention on the fast path: the Q, K, V projections as one GEMM (K, V as one for cross-attention).

Replaces: `pare/models/attention.py Attention.forward`. Same function, same weights: the three
(inner, dim) weights are stacked into one (3*inner, dim) matrix, and `to_q.weight`, `to_k.weight`,
`to_v.weight` become views into it, so the state dict, `load_state_dict` and LoRA fusing still
see (and write) the usual parameters. One GEMM of 3x the width fills the GPU better than three,
and reads the activations once instead of three times.

Maps (the VAE's attention) stay channels last: GroupNorm by the Triton kernel, tokens as a view.

The three projections run as their own modules instead when one carries a LoRA forward hook (the
hook belongs to the module's own call), under torch.compile (which fuses on its own, and cannot
trace the data-pointer check), and when the fused weights no longer back the parameters (after
`.to(dtype)`, say): then the fusion is redone on the next call outside graph capture.

Attention itself runs `kernels/attention.py`: its Triton kernel over few keys (the text's, a small map's), SDPA
(cuDNN's kernel) over many, or with a mask.

`attend` stops before the output projection: `FastBasicTransformerBlock` runs the projection itself
and leaves the residual add to the LayerNorm kernel that follows it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import Attention
from ..models.lora_scale import lora_call
from .kernels.attention import attention
from .kernels.group_norm import group_norm
from .resnet import plain


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of Linears on the same input into one; theirs become views of it."""
    weight = torch.cat([l.weight.detach() for l in linears])  # (sum of outs, in)
    bias = torch.cat([l.bias.detach() for l in linears]) if linears[0].bias is not None else None
    start = 0
    for l in linears:
        n = l.out_features
        l.weight = nn.Parameter(weight[start:start + n], requires_grad=l.weight.requires_grad)
        if bias is not None:
            l.bias = nn.Parameter(bias[start:start + n], requires_grad=l.bias.requires_grad)
        start += n
    return weight, bias


class FastAttention(Attention):
    def fuse(self) -> None:
        group = [self.to_k, self.to_v] if self.is_cross_attention else [self.to_q, self.to_k, self.to_v]
        self._fused = fuse_linears(group)
        self._fused_group = group

    def _fused_ok(self) -> bool:
        weight = getattr(self, "_fused", (None,))[0]
        if weight is None or weight.device != self.to_v.weight.device or weight.dtype != self.to_v.weight.dtype:
            return False
        starts = itertools.accumulate([0] + [l.out_features for l in self._fused_group])
        return all(l.weight.data_ptr() == weight[start].data_ptr() for l, start in zip(self._fused_group, starts))

    def projections(self, hidden_states: torch.Tensor, context: torch.Tensor | None,
                    lora_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, N, inner) of the tokens, k and v (B, M, inner) of the context (the tokens when None):
        one GEMM for the fused group where nothing (a LoRA hook, torch.compile, graph capture) forbids it."""
        self_context = context is None
        fused = (all(plain(m) for m in (self.to_q, self.to_k, self.to_v)) and self_context != self.is_cross_attention
                 and not torch.compiler.is_compiling())  # compile cannot trace the data-pointer check below
        if fused and not self._fused_ok():
            fused = not (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing())
            if fused:  # refuse the stale fused weights: fuse again from the parameters as they are now
                self.fuse()
        if not fused:
            context = hidden_states if self_context else context
            return tuple(lora_call(m, x, lora_scale) for m, x in
                         ((self.to_q, hidden_states), (self.to_k, context), (self.to_v, context)))
        weight, bias = self._fused
        if self_context:
            return F.linear(hidden_states, weight, bias).chunk(3, dim=-1)  # (B, N, 3*inner) -> 3 x (B, N, inner), views
        k, v = F.linear(context, weight, bias).chunk(2, dim=-1)  # (B, M, 2*inner) -> 2 x (B, M, inner), views
        return lora_call(self.to_q, hidden_states, lora_scale), k, v

    def attend(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, lora_scale: float = 1.0,
               kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V of tokens (B, N, C): (B, N, inner), before the output projection.
        kv: K and V (B, M, inner) of the context, already projected (`FastTransformer2DModel` projects the text
        for all its blocks at once); else they are projected here."""
        batch, heads, d = hidden_states.shape[0], self.heads, self.inner_dim // self.heads
        if kv is None:
            q, k, v = self.projections(hidden_states, context, lora_scale)
        else:
            q, (k, v) = lora_call(self.to_q, hidden_states, lora_scale), kv
        if attention_mask is None:  # few keys: the Triton kernel; else SDPA
            return attention(q, k, v, heads)  # (B, N, heads*d)
        q, k, v = (x.view(batch, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (B, heads, N or M, d), strided views
        attention_mask = self._check_mask(attention_mask, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads, N, d)
        return out.transpose(1, 2).reshape(batch, -1, self.inner_dim)  # (B, N, heads*d)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, lora_scale: float = 1.0) -> torch.Tensor:
        residual = hidden_states
        is_map = hidden_states.ndim == 4
        if is_map:
            b, c, h, w = hidden_states.shape
            if self.group_norm is not None:
                n = self.group_norm
                hidden_states = group_norm(hidden_states, n.num_groups, n.weight, n.bias, n.eps)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C); a view if channels last
        elif self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = self.attend(hidden_states, encoder_hidden_states, attention_mask, lora_scale)  # (B, N, inner)
        out = self.to_out[1](lora_call(self.to_out[0], out, lora_scale))
        if is_map:
            out = out.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W), channels last
        if self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor
