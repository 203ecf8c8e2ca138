"""LoRA on a Linear or Conv2d, kept outside the module: a forward hook adds the low-rank path.

diffusers twin: peft's `tuners/lora/layer.py` (`Linear`, `Conv2d`: `forward`, `merge`, `unmerge`),
which diffusers wraps every target layer in. pare leaves its modules as they are (same class, same
state-dict keys, no branch in their forward): each target gets one `LoRAHook` holding its adapters.

    unfused   y = W x + b  +  sum_a  w_a * (alpha_a / r_a) * up_a(down_a(x))     (hook, per call)
    fused     W <- W + lora_scale * sum_a w_a * (alpha_a / r_a) * up_a @ down_a  (once; hook idle)

w_a is the adapter's weight from `set_adapters` (1 when loaded). Fusing keeps a copy of W, so
unfusing restores it bit for bit (peft subtracts the delta again, which rounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import LoRAWeights


class LoRAHook:
    """The adapters of one target module and the forward hook that applies the active ones."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.adapters: dict[str, LoRAWeights] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight w_a
        self.original_weight: torch.Tensor | None = None  # set while fused
        self.enabled = True
        self.handle = module.register_forward_hook(self.hook)

    # -- unfused path ---------------------------------------------------------------------------

    def _on(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=like.device, dtype=like.dtype)

    def _cast(self, name: str, like: torch.Tensor) -> LoRAWeights:
        lora = self.adapters[name]
        if lora.down.device != like.device or lora.down.dtype != like.dtype:  # follow the model's .to(), once
            lora = self.adapters[name] = LoRAWeights(self._on(lora.down, like), self._on(lora.up, like), lora.alpha)
        return lora

    def low_rank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora, m = self._cast(name, x), self.module
        if isinstance(m, nn.Linear):
            return F.linear(F.linear(x, lora.down), lora.up)  # (..., in) -> (..., r) -> (..., out)
        h = F.conv2d(x, lora.down, stride=m.stride, padding=m.padding, dilation=m.dilation)  # (B, r, H', W')
        return F.conv2d(h, lora.up)  # (B, out, H', W')

    def hook(self, module, args, output):
        if not self.enabled or self.original_weight is not None or not self.active:
            return output
        x = args[0]
        for name, weight in self.active.items():
            output = output + self.low_rank(name, x) * (weight * self.adapters[name].scale)
        return output

    # -- fused path -----------------------------------------------------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """up @ down as a weight of the module's shape, in its dtype (peft's `get_delta_weight`)."""
        lora = self._cast(name, self.module.weight)
        if lora.down.ndim == 2:
            return lora.up @ lora.down  # (out, r) @ (r, in) -> (out, in)
        return torch.einsum("or,rihw->oihw", lora.up[:, :, 0, 0], lora.down)  # (out, in, kh, kw)

    @torch.no_grad()
    def fuse(self, lora_scale: float, names: list[str]) -> None:
        if self.original_weight is not None:
            raise ValueError("LoRA is already fused into this model: call unfuse_lora() first")
        weight = self.module.weight
        self.original_weight = weight.detach().clone()
        for name in names:
            weight += self.delta(name) * (lora_scale * self.active.get(name, 1.0) * self.adapters[name].scale)

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.original_weight is not None:
            self.module.weight.copy_(self.original_weight)
            self.original_weight = None

    def remove(self) -> None:
        self.handle.remove()


def hooks_of(model: nn.Module) -> dict[str, LoRAHook]:
    return getattr(model, "_pare_lora_hooks", None) or {}


def attach(model: nn.Module, adapter: str, weights: dict[str, LoRAWeights]) -> None:
    """Add one adapter to `model`'s target modules (hooks made on first use); the caller sets what is active."""
    hooks = hooks_of(model)
    if not hooks:
        object.__setattr__(model, "_pare_lora_hooks", hooks)  # not a submodule, not in the state dict
    dtype = next(model.parameters()).dtype
    for path, lora in weights.items():
        if path not in hooks:
            hooks[path] = LoRAHook(model.get_submodule(path))
        hooks[path].adapters[adapter] = LoRAWeights(lora.down.to(dtype), lora.up.to(dtype), lora.alpha)


def detach(model: nn.Module) -> None:
    for hook in hooks_of(model).values():
        hook.remove()
    if hooks_of(model):
        object.__delattr__(model, "_pare_lora_hooks")
