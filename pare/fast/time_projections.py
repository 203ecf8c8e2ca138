"""Every ResNet's time-embedding projection of a UNet as one GEMM per denoising step.

Replaces: the `time_emb_proj(silu(temb))` of each `pare/models/resnet.py ResnetBlock2D` (22 of them
in SD1.5's UNet, 17 in SDXL's). Each block projects the same embedding: (B, 1280) -> (B, C_out),
a GEMM of 2 rows, so each of them costs a launch, not FLOPs, and so does each block's SiLU of it.
Here the weights are stacked into one (sum of C_out, 1280) matrix, each block's `time_emb_proj`
weight and bias becoming views into it (as `attention.py` fuses Q, K, V: the state dict, loading
and LoRA fusing see the usual parameters), and the first block to ask computes all of them:
one SiLU, one GEMM. The result is kept for the blocks that follow while the embedding is the same
tensor, unchanged (its version counter), which within one UNet call it is.

A block whose projection carries a LoRA hook computes its own projection, as the reference does.
When the weights no longer back the stack (after `.to(dtype)`), it is stacked again on the next
call outside graph capture.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lora_scale import lora_call
from .attention import fuse_linears
from .graph import version


class TimeProjections:
    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.weight, self.bias = fuse_linears(linears)  # (sum of C_out, C_emb), (sum of C_out,)
        starts = [0]
        for l in linears:
            starts.append(starts[-1] + l.out_features)
        self.slices = {id(l): (a, b) for l, a, b in zip(linears, starts, starts[1:])}
        self.last = None  # (weak reference to the embedding, its version, the projections)

    def valid(self) -> bool:
        return all(l.weight.data_ptr() == self.weight[self.slices[id(l)][0]].data_ptr()
                   and l.weight.dtype == self.weight.dtype and l.weight.device == self.weight.device
                   for l in self.linears)

    def project(self, linear: nn.Linear, temb: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        """linear(silu(temb)), (B, C_out): a slice of all the blocks' projections, computed once per embedding."""
        if (torch.compiler.is_compiling() or version(temb) is None  # compile cannot trace the checks below
                or id(linear) not in self.slices):  # a projection swapped in after optimize is not in the stack
            return lora_call(linear, F.silu(temb), lora_scale)
        last = self.last
        if last is None or last[0]() is not temb or last[1] != version(temb):  # the first block of a call asks
            if not self.valid():  # the parameters were replaced (`.to(dtype)`, say): stack them again, outside a capture
                if temb.is_cuda and torch.cuda.is_current_stream_capturing():
                    return lora_call(linear, F.silu(temb), lora_scale)
                self.__init__(self.linears)
            last = self.last = (weakref.ref(temb), version(temb), F.linear(F.silu(temb), self.weight, self.bias))
        a, b = self.slices[id(linear)]
        return last[2][:, a:b]  # (B, C_out)


def attach(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Give the ResNet blocks of `model` that project a SiLU'd embedding one shared TimeProjections."""
    groups: dict = {}
    for block in blocks:
        proj = getattr(block, "time_emb_proj", None)
        if type(proj) is nn.Linear and proj.bias is not None and not block.skip_time_act:  # not a LoRA wrapper
            groups.setdefault((proj.in_features, proj.weight.dtype, proj.weight.device), []).append(block)
    for group in groups.values():
        if len(group) > 1:
            bank = TimeProjections([b.time_emb_proj for b in group])
            for b in group:
                b.__dict__["_time_projections"] = bank


def detach(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_time_projections", None)
