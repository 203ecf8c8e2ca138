"""`ModelMixin`: `from_pretrained` and `save_pretrained` for pare's models.

diffusers twin: `models/modeling_utils.py` (`ModelMixin`).

The model is built from its config on the meta device (no memory, no random init) and the
checkpoint's tensors are assigned to it after `check_state_dict` has approved every key,
so a model is either fully loaded or not built at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configuration import ConfigMixin, load_config_file
from ..loading import (
    WEIGHTS_NAME,
    WeightLoadError,
    add_variant,
    check_state_dict,
    find_weight_files,
    read_state_dict,
    resolve_folder,
)


class ModelMixin(torch.nn.Module, ConfigMixin):
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        allow_bin: bool = False,
        device: str | torch.device | None = None,
        **hub_kwargs,
    ):
        """Load a diffusers-format model folder (local, or a Hub repo id with `subfolder`).

        Like diffusers, the model comes back in float32 unless `torch_dtype` says otherwise,
        whatever dtype the file stores. `hub_kwargs`: revision, cache_dir, local_files_only, token.
        """
        folder = resolve_folder(path_or_repo_id, subfolder, **hub_kwargs)
        config = load_config_file(folder, cls.config_name)
        class_name = config.get("_class_name")
        if class_name is not None and class_name != cls.__name__:
            raise ValueError(f"{folder / cls.config_name} describes a {class_name}, not a {cls.__name__}")

        files = find_weight_files(folder, variant, allow_bin)
        state_dict, _ = read_state_dict(files)
        source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"

        with torch.device("meta"):
            model = cls.from_config(folder / cls.config_name)  # the path, so that config errors name the file
        check_state_dict(model, state_dict, source)
        model.load_state_dict(state_dict, strict=True, assign=True)
        leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # a tensor made in __init__ that no checkpoint can fill: a bug in pare, not in the file
            raise WeightLoadError(f"{cls.__name__} has tensors the checkpoint does not set: {leftover}")
        model.to(device=device, dtype=torch_dtype or torch.float32)
        return model.eval()

    @classmethod
    def from_single_file(cls, path_or_state_dict, **kwargs):
        """Load from a single file in Stability's original layout (`model.diffusion_model.*`, `first_stage_model.*`).

        diffusers' arguments: `config=` (a diffusers folder, Hub id or dict; default: the file's family's
        official config), `subfolder`, `torch_dtype`, plus `allow_pickle` and `extract_ema`. See pare/single_file/.
        """
        from ..single_file import model_from_single_file

        return model_from_single_file(cls, path_or_state_dict, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None, max_shard_size: int | None = None):
        """Write `config.json` and safetensors weights, sharded past `max_shard_size` bytes, as diffusers lays them out."""
        folder = Path(folder)
        self.save_config(folder)
        state_dict = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        shards, current, size = [], {}, 0
        for key, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            if max_shard_size is not None and current and size + nbytes > max_shard_size:
                shards.append(current)
                current, size = {}, 0
            current[key], size = tensor, size + nbytes
        shards.append(current)

        if len(shards) == 1:
            save_file(shards[0], str(folder / add_variant(f"{WEIGHTS_NAME}.safetensors", variant)), {"format": "pt"})
            return folder
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = add_variant(f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors", variant)
            save_file(shard, str(folder / name), {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": weight_map}
        (folder / add_variant(f"{WEIGHTS_NAME}.safetensors.index.json", variant)).write_text(json.dumps(index, indent=2))
        return folder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
