"""`load_lora_weights`, `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights` for pare's pipelines.

diffusers twins: `loaders/lora_pipeline.py` (`StableDiffusionLoraLoaderMixin`,
`StableDiffusionXLLoraLoaderMixin`) and `loaders/lora_base.py` (`LoraBaseMixin`). Names,
arguments and defaults are diffusers'; where pare differs on purpose:

- a LoRA key that matches nothing, or a LoRA that fits only part of the model, is an error that
  lists what was left over (diffusers warns and loads the rest); nothing is then loaded;
- `unfuse_lora` restores the weights bit for bit (a copy is kept; peft subtracts the delta);
- `fuse_lora(lora_scale=s)` changes the weights only: diffusers also multiplies peft's per-adapter
  scaling by s and leaves it so after `unfuse_lora`, so that its unfused LoRA then runs at s
  (and at 0 for good after `fuse_lora(lora_scale=0)`) until `set_adapters` resets it;
- adapters are forward hooks beside the modules (layers.py), so the modules, their state dicts
  and their forward code are unchanged while a LoRA is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .formats import COMPONENTS, read_lora
from .layers import attach, detach, hooks_of

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name inside a LoRA folder


class LoraLoaderMixin:
    """LoRA for every pipeline with a `unet` and one or two CLIP text encoders."""

    def _lora_models(self, components=None) -> dict:
        names = COMPONENTS if components is None else components
        unknown = sorted(set(names) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"components {unknown} take no LoRA; LoRA-loadable components: {list(COMPONENTS)}")
        return {c: getattr(self, c) for c in names if getattr(self, c, None) is not None}

    def get_list_adapters(self) -> dict[str, list[str]]:
        """component -> the adapters loaded into it (diffusers' `get_list_adapters`)."""
        out = {}
        for component, model in self._lora_models().items():
            names = []
            for hook in hooks_of(model).values():
                names += [n for n in hook.adapters if n not in names]
            if names:
                out[component] = names
        return out

    def get_active_adapters(self) -> list[str]:
        names = []
        for model in self._lora_models().values():
            for hook in hooks_of(model).values():
                names += [n for n in hook.active if n not in names]
        return names

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, allow_pickle: bool = False):
        """Load a LoRA (a file, a folder holding `weight_name`, or a state dict) as adapter `adapter_name`.

        Default name: `default_{i}`, i the number of adapters loaded so far (diffusers'). As in diffusers, the
        new adapter becomes the only active one, with weight 1; `set_adapters` activates several.
        """
        from ..single_file.errors import SingleFileError
        from ..single_file.loader import read_checkpoint

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            source = Path(source) / (weight_name or LORA_WEIGHT_NAME)
        state_dict, name = read_checkpoint(source, allow_pickle)
        models = self._lora_models()
        lora = read_lora(state_dict, models, name)  # every check before anything is attached
        loaded = {n for names in self.get_list_adapters().values() for n in names}
        adapter_name = adapter_name or f"default_{len(loaded)}"
        if adapter_name in loaded:
            raise SingleFileError(f"adapter name {adapter_name!r} is already in use (loaded: {sorted(loaded)}); "
                                  "pass another adapter_name, or unload_lora_weights() first")
        for component, weights in lora.items():
            attach(models[component], adapter_name, weights)
        for model in models.values():
            for hook in hooks_of(model).values():
                hook.active = {adapter_name: 1.0} if adapter_name in hook.adapters else {}

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Make exactly these adapters active, each with its weight w_a (1 when not given)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
        elif isinstance(adapter_weights, (list, tuple)) and all(isinstance(w, (int, float)) for w in adapter_weights):
            weights = [float(w) for w in adapter_weights]
        else:
            raise TypeError("adapter_weights must be a number or a list of numbers, one per adapter (pare has no "
                            f"per-component or per-block weights), not {adapter_weights!r}")
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter_weights")
        loaded = {n for ns in self.get_list_adapters().values() for n in ns}
        missing = sorted(set(names) - loaded)
        if missing:
            raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {sorted(loaded)}")
        for model in self._lora_models().values():
            for hook in hooks_of(model).values():
                if hook.original_weight is not None:
                    raise ValueError("set_adapters() while LoRA is fused: call unfuse_lora() first")
                hook.active = {n: w for n, w in zip(names, weights) if n in hook.adapters}

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None):
        """W <- W + lora_scale * sum_a w_a * (alpha_a / r_a) * up_a @ down_a, for the active (or the named) adapters."""
        models = self._lora_models(components)
        if not any(hooks_of(m) for m in models.values()):
            raise ValueError("fuse_lora(): no LoRA is loaded")
        for component, model in models.items():
            for path, hook in hooks_of(model).items():
                names = [n for n in (adapter_names or hook.active) if n in hook.adapters]
                hook.fuse(lora_scale, names)
                if safe_fusing and not bool(torch.isfinite(hook.module.weight).all()):
                    self.unfuse_lora(components)
                    raise ValueError(f"fusing the LoRA makes {component}.{path}.weight non-finite (NaN or inf); "
                                     "nothing was fused")

    def unfuse_lora(self, components: list[str] | None = None):
        """Restore the weights saved by `fuse_lora`, exactly; the adapters work unfused again."""
        for model in self._lora_models(components).values():
            for hook in hooks_of(model).values():
                hook.unfuse()

    def unload_lora_weights(self):
        """Remove every adapter. Weights fused before stay fused (as in diffusers: fuse, then unload, keeps the fusion)."""
        for model in self._lora_models().values():
            detach(model)

    def delete_adapters(self, adapter_names: str | list[str]):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for model in self._lora_models().values():
            for hook in hooks_of(model).values():
                for n in names:
                    hook.adapters.pop(n, None)
                    hook.active.pop(n, None)
