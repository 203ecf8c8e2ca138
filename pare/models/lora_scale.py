"""The LoRA scale at call time: where `cross_attention_kwargs={"scale": s}` goes.

diffusers twin: `utils/peft_utils.py` (`apply_lora_scale`, `scale_lora_layers`): diffusers pops
"scale" from `cross_attention_kwargs` and sets it on every peft LoRA layer of the model for the
length of the call. pare passes it down instead, as a plain float argument `lora_scale` of the
blocks' forward methods, from the UNet (or ControlNet) to the layers that can carry a LoRA.

Source: LoRA, Hu et al. (arXiv 2106.09685, eq. 3): a layer W x becomes W x + s * (alpha / r) B A x,
s being this scale. A LoRA module (not part of this file) that wraps a layer marks itself with
`takes_lora_scale = True` and takes `forward(x, lora_scale)`. Every other layer is called as it
is, so with no LoRA loaded the scale changes nothing, as in diffusers.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_call(layer: nn.Module, x: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
    """`layer(x)`; a LoRA-carrying layer (`takes_lora_scale`) also gets the call's scale."""
    if getattr(layer, "takes_lora_scale", False):
        return layer(x, lora_scale)
    return layer(x)


# The keys of `cross_attention_kwargs` pare honours (diffusers' default processor takes no others).
CROSS_ATTENTION_KWARGS = ("scale",)


def lora_scale_from(cross_attention_kwargs: dict | None) -> float:
    """`cross_attention_kwargs` -> the LoRA scale of the call (1.0 when absent)."""
    if not cross_attention_kwargs:
        return 1.0
    unknown = sorted(set(cross_attention_kwargs) - set(CROSS_ATTENTION_KWARGS))
    if unknown:
        # diffusers warns and ignores keys its attention processor does not take; pare refuses them.
        raise ValueError(f"cross_attention_kwargs {unknown} are not taken by pare's attention; "
                         f"the keys it takes: {CROSS_ATTENTION_KWARGS}")
    return float(cross_attention_kwargs.get("scale", 1.0))
