"""The UNet's transformer on the fast path: channels last in and out, no layout copies; the GEGLU gate
in its up-projection's GEMM; the blocks' residual adds fused into the LayerNorms that follow them.

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

The 1x1 conv proj_in (SD1.x) runs without its bias, which the first block's norm1 kernel adds as
it reads the tokens: the same rounding as the reference's separate bias add (PyTorch adds a
cuDNN conv's bias in a pass of its own), without the pass.

Where a transformer stacks several blocks (SDXL: 2 or 10 a stage), two more things are shared:
the last add of each block (after its feed-forward) is done by the next block's norm1 kernel, and
the text is projected to every block's cross-attention K and V by one GEMM: the K and V weights of
all the blocks are stacked into one matrix (theirs become views of it, as in `attention.py`), since
they all read the same text. Each block's own GEMM there has 2 x 77 rows: a launch, not FLOPs.
This path needs the blocks free of hooks (`plain`), so the parity suite's recorded (accumulated)
rows, which hook every block, run the blocks one by one; its local row of the transformer runs it.

Tried first: the LayerNorm kernel also wrote x + b_out, and the projection's GEMM accumulated into
it (`addmm_`, beta = 1), which saved the third add too; but the residual stream was rounded twice
(x + b, then the sum), and each block's error against float64 came out 1.35x diffusers' (within the
budget only thanks to its floor; benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lora_scale import lora_call
from ..models.transformer import GEGLU, BasicTransformerBlock, Transformer2DModel
from .attention import FastAttention, fuse_linears
from .graph import version
from .kernels.geglu import geglu, geglu_linear
from .kernels.group_norm import add_bias_residual, group_norm
from .kernels.layer_norm import layer_norm
from .resnet import plain


class FastGEGLU(GEGLU):
    def forward(self, hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        if plain(self.proj):  # the projection and the gate in one GEMM: (B, N, dim) -> (B, N, inner)
            return geglu_linear(hidden_states, self.proj.weight, self.proj.bias)
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
        out, h = self.fused(hidden_states, encoder_hidden_states, encoder_attention_mask, attention_mask, lora_scale)
        return out + h

    def fused(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
              encoder_attention_mask: torch.Tensor | None, attention_mask: torch.Tensor | None, lora_scale: float,
              residual: torch.Tensor | None = None,
              kv: tuple[torch.Tensor, torch.Tensor] | None = None,
              halves: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with each residual add done by the kernel of the norm that follows it; for a `_fusable` block.
        Returns (ff_out, h), the feed-forward's output and the residual stream, whose sum is the block's output:
        the next block's norm1 adds them (`residual`), one pass fewer. kv: attn2's K and V of the text.
        halves: hidden_states is one half of a CFG batch (B of 2B), equal to the other: the self-attention runs on
        it, and its output and the stream are copied to both halves before the text comes in (`unet.py`)."""
        def project(attn, y, context, mask, kv=None):  # the output projection, as a module: LoRA hooks on it fire
            return attn.to_out[1](lora_call(attn.to_out[0], attn.attend(y, context, mask, lora_scale, kv), lora_scale))

        # hidden_states: (B, N, dim)
        # 1. self-attention over the image tokens (over the text with only_cross_attention)
        context = encoder_hidden_states if self.only_cross_attention else None
        n = self.norm1
        h, y = layer_norm(hidden_states, n.weight, n.bias, n.eps, residual=residual)
        out = project(self.attn1, y, context, attention_mask)
        if halves:  # (B, N, dim) -> (2B, N, dim): the halves part at the text
            out, h = torch.cat([out, out]), torch.cat([h, h])
        # 2. cross-attention: image tokens query the text tokens; h = out + h and its norm in one kernel
        if self.attn2 is not None:
            n = self.norm2
            h, y = layer_norm(out, n.weight, n.bias, n.eps, residual=h)
            out = project(self.attn2, y, encoder_hidden_states, encoder_attention_mask, kv)
        # 3. feed-forward (its GEGLU gate in one kernel)
        n = self.norm3
        h, y = layer_norm(out, n.weight, n.bias, n.eps, residual=h)
        return self.ff(y, lora_scale), h


MODEL_STACK_MAX = 32768  # K, V output columns a whole model may stack: SD1.x and SD2.x (24960) do, SDXL (166400) not


@dataclass(eq=False)
class ContextStack:
    """The K and V weights of some cross-attentions, all reading the same text, stacked into one matrix.

    One stack per transformer of several blocks; or one for all of a model's transformers (`stack_context`),
    where its K, V output of a call (tokens x columns) is small. The first of `users` in the model's order
    projects the text for all of them, and each takes its columns; the last lets the product go. The first
    projects at every call, not only for a new text: the text is often the same tensor from call to call (a
    CUDA graph's static input is), and a memo of it would leave the GEMM out of a capture.
    The exception is `held` (`hold_context`): through a denoising loop run as one program (the loop's own CUDA
    graph, or eagerly), the text is one tensor at every step, so the product of the first step serves them all.
    """
    weight: torch.Tensor  # (sum of 2*inner, cross_attention_dim)
    bias: torch.Tensor | None
    users: list
    product: tuple | None = None  # (text, its version, K and V of the text for every user) during a call
    held: bool = False  # keep the product from call to call while the text is the same tensor, unchanged


def stack_context(transformers: list["FastTransformer2DModel"]) -> None:
    """Stack the cross-attention K and V weights of `transformers` into one matrix (theirs become views, and so
    does each attention's own fused K, V); each transformer's entry in `_context` says where its blocks' are."""
    usable = [t for t in transformers if len(t.transformer_blocks) > 0 and all(
        isinstance(b.attn2, FastAttention) and b.attn2.is_cross_attention for b in t.transformer_blocks)]
    for t in transformers:
        t._context = None
    attns = [b.attn2 for t in usable for b in t.transformer_blocks]
    if len(attns) < 2:
        return
    weight, bias = fuse_linears([l for a in attns for l in (a.to_k, a.to_v)])  # (sum of 2*inner, cross_dim)
    stack = ContextStack(weight, bias, usable)
    start = 0
    for t in usable:
        slices, lo = [], start
        for a in (b.attn2 for b in t.transformer_blocks):
            stop = start + 2 * a.inner_dim
            a._fused, a._fused_group = (weight[start:stop], None if bias is None else bias[start:stop]), [a.to_k, a.to_v]
            slices.append((start, start + a.inner_dim, stop))
            start = stop
        t._context = (stack, lo, start, slices)


@contextlib.contextmanager
def hold_context(model: nn.Module):
    """While open, the text's cross-attention K and V of `model` are projected once and kept from call to call
    (`ContextStack.held`), for as long as the text is the same tensor, unchanged: a denoising loop's, whose text is
    the same at every step (`denoise.py`). Not around calls that replay the UNet's own per-call graph: its capture
    would leave out the projection that a later call's new text needs."""
    stacks = list({id(e[0]): e[0] for t in model.modules() if isinstance(t, FastTransformer2DModel)
                   for e in [t.__dict__.get("_context")] if e is not None}.values())
    for s in stacks:
        s.held = True
    try:
        yield
    finally:
        for s in stacks:
            s.held, s.product = False, None


class FastTransformer2DModel(Transformer2DModel):
    def fuse(self) -> None:
        """This transformer's own stack of its blocks' cross-attention K and V (SDXL's several blocks)."""
        stack_context([self])

    def context_kv(self, context: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each block's cross-attention K and V of the text (B, M, inner), from the stack's one GEMM (made by its
        first user, in a model-wide stack); None where the blocks must project their own (no stack, a LoRA hook
        on K or V, torch.compile, stale weights)."""
        entry = self.__dict__.get("_context")
        if entry is None or context is None or torch.compiler.is_compiling():
            return None
        attns = [b.attn2 for b in self.transformer_blocks]
        if not all(plain(a.to_k) and plain(a.to_v) for a in attns):
            return None
        stack, lo, hi, slices = entry
        if not all(a.to_k.weight.data_ptr() == stack.weight[s].data_ptr()
                   and a.to_v.weight.data_ptr() == stack.weight[m].data_ptr() and a.to_v.weight.dtype == stack.weight.dtype
                   for a, (s, m, _) in zip(attns, slices)):
            if context.is_cuda and torch.cuda.is_current_stream_capturing():
                return None  # the parameters were replaced (`.to(dtype)`, say): restack outside a capture
            stack_context(stack.users)  # from the parameters as they are now: the check above holds by construction
            if self._context is None:
                return None
            stack, lo, hi, slices = self._context
        made = stack.product
        fresh = made is not None and made[0] is context and made[1] == version(context) and version(context) is not None
        if stack.users[0] is self and not (stack.held and fresh):  # the first in the model's order: the text through
            stack.product = made = (context, version(context), F.linear(context, stack.weight, stack.bias))  # all
        if made is not None and made[0] is context and made[1] == version(context):
            kv, base = made[2], 0  # (B, M, sum over the stack's users)
        else:  # called on its own (or the first did not run): this transformer's columns only
            bias = None if stack.bias is None else stack.bias[lo:hi]
            kv, base = F.linear(context, stack.weight[lo:hi], bias), lo  # (B, M, its sum of 2*inner)
        if stack.users[-1] is self and not stack.held:
            stack.product = None  # the last user: let the product go
        return [(kv[..., s - base:m - base], kv[..., m - base:e - base]) for s, m, e in slices]  # (B, M, inner) views

    def fusable(self) -> bool:
        """Whether its blocks run fused (`FastBasicTransformerBlock.fused`): fast, free of hooks, `_fusable`."""
        blocks = self.transformer_blocks
        return bool(blocks) and all(plain(b) and isinstance(b, FastBasicTransformerBlock) and b._fusable()
                                    for b in blocks)

    def halvable(self) -> bool:
        """Whether `halves=True` applies: fused blocks, the first one's attn1 over the image (not the text)."""
        return self.fusable() and not self.transformer_blocks[0].only_cross_attention

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                lora_scale: float = 1.0, *, halves: bool = False) -> torch.Tensor:
        """halves: hidden_states (B, C, H, W) is one half of a CFG batch, equal to the other (`unet.py`); the
        output is the whole batch's, (2B, C, H, W). Needs `halvable` and no attention_mask (it is per sample)."""
        if halves and (not self.halvable() or attention_mask is not None):
            raise ValueError("Transformer2DModel(halves=True) needs fused blocks whose first attends over the image, "
                             "and no attention_mask; check halvable() first")
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        n = self.norm
        hidden_states = group_norm(hidden_states, n.num_groups, n.weight, n.bias, n.eps)  # (B, C, H, W)

        blocks = self.transformer_blocks
        fused = self.fusable()
        stream = None  # what is still to be added to hidden_states: proj_in's bias, then a block's ff output

        # 1. project in and flatten: (B, C, H, W) -> (B, H*W, inner_dim)
        proj = self.proj_in
        if self.use_linear_projection:
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view if channels last
            hidden_states = lora_call(proj, hidden_states, lora_scale)
        else:
            if fused and plain(proj) and proj.bias is not None:  # its bias is added by the first norm1's kernel
                hidden_states = proj._conv_forward(hidden_states, proj.weight, None)  # (B, inner_dim, H, W)
                stream = proj.bias  # (inner_dim,)
            else:
                hidden_states = lora_call(proj, hidden_states, lora_scale)  # (B, inner_dim, H, W)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, self.inner_dim)

        # 2. the transformer blocks, on tokens; fused, each block's last add is done by the next one's norm1
        if fused:
            kvs = self.context_kv(encoder_hidden_states) or [None] * len(blocks)
            for i, (block, kv) in enumerate(zip(blocks, kvs)):
                hidden_states, stream = block.fused(hidden_states, encoder_hidden_states, encoder_attention_mask,
                                                    attention_mask, lora_scale, stream, kv, halves and i == 0)
            hidden_states = hidden_states + stream
            if halves:  # the blocks made the whole batch of one half
                b, residual = 2 * b, torch.cat([residual, residual])  # (2B, C, H, W), channels last as it was
        else:
            for block in blocks:
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
