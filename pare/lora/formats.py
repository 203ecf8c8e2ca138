"""LoRA files in the formats people have, read into one form: per component, per module, (down, up, alpha).

diffusers twins: `loaders/lora_pipeline.py` (`lora_state_dict`), `loaders/lora_conversion_utils.py`
(`_convert_non_diffusers_lora_to_diffusers`, `_maybe_map_sgm_blocks_to_diffusers`).

    format                 a key                                                         down / up
    diffusers / peft       unet.down_blocks.0.attentions.0....attn1.to_q.lora_A.weight   lora_A / lora_B
    older diffusers        unet.<module>.lora.down.weight, text_encoder.<module>.lora_linear_layer.up.weight
    attention processors   down_blocks.0....attn1.processor.to_q_lora.down.weight         (UNet only, no prefix)
    kohya / A1111          lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight + .alpha

kohya writes module paths with every "." made "_". They are resolved against the model's own
modules (every Linear and Conv2d, by its diffusers path and, for the UNet, by its original LDM
path through pare/single_file/unet_map.py: SDXL LoRAs name `input_blocks_4_1_...`), so an
underscore inside a name (`to_q`, `proj_in`) is never guessed at.

The math (Hu et al., "LoRA", arXiv 2106.09685, eq. 3): W' = W + scale * (alpha / rank) * up @ down,
with alpha = rank when the file gives none (peft's default, scale 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}

# (regex, how its groups name (component, module, part)); part is "down", "up" or "alpha".
PATTERNS = (
    (re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight"), "peft"),
    (re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.alpha"), "peft_alpha"),
    (re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight"), "old"),
    (re.compile(r"(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"), "attn_procs"),
    (re.compile(r"lora_(unet|te|te1|te2)_(.+)\.(lora_down|lora_up)\.weight"), "kohya"),
    (re.compile(r"lora_(unet|te|te1|te2)_(.+)\.alpha"), "kohya_alpha"),
)


@dataclass
class LoRAWeights:
    down: torch.Tensor  # A: (r, in) or conv (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or conv (out, r, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (peft's `scaling` before any adapter weight)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


def parse_key(key: str):
    """(component, module name as written, part, naming) or None for a key of no known format."""
    for regex, kind in PATTERNS:
        m = regex.fullmatch(key)
        if m is None:
            continue
        if kind == "peft":
            return m[1], m[2], "down" if m[3] == "A" else "up", "dotted"
        if kind == "peft_alpha":
            return m[1], m[2], "alpha", "dotted"
        if kind == "old":
            return m[1], m[2], m[3], "dotted"
        if kind == "attn_procs":
            return "unet", f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}", m[3], "dotted"
        component = KOHYA_COMPONENTS[m[1]]
        part = "alpha" if kind == "kohya_alpha" else m[3].removeprefix("lora_")
        return component, m[2], part, "underscored"
    return None


def lora_targets(component: str, model: nn.Module) -> dict[str, str]:
    """Every name a LoRA may give a Linear / Conv2d of `model` -> its module path in `model`."""
    names = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        spellings = {path, path.removeprefix("text_model."), "text_model." + path.removeprefix("text_model.")}
        if component == "unet" and (ldm := _ldm_name(model, path)) is not None:
            spellings.add(ldm)
        for name in spellings:
            names[name] = path
            names[name.replace(".", "_")] = path
    return names


def _ldm_name(unet, path: str) -> str | None:
    """The module's name in the original LDM UNet, or None for one it has no twin of (LCM's cond_proj)."""
    from ..single_file.unet_map import UNET_MAP

    try:
        (name,) = UNET_MAP.names([path + ".weight"], unet.config).values()
    except KeyError:
        return None
    return name.original.removesuffix(".weight")


def read_lora(state_dict: dict, models: dict[str, nn.Module], source: str) -> dict[str, dict[str, LoRAWeights]]:
    """component -> module path -> LoRAWeights, every key used and every shape checked, or one error naming all."""
    from ..single_file.errors import SingleFileError, listed

    targets = {c: lora_targets(c, m) for c, m in models.items() if m is not None}
    found: dict[tuple[str, str], dict] = {}
    unknown, unmatched = [], []
    for key, tensor in state_dict.items():
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, name, part, _ = parsed
        path = targets.get(component, {}).get(name)
        if path is None:
            unmatched.append(f"{key} (no {component} module named {name!r})" if component in targets
                             else f"{key} (this pipeline has no {component})")
            continue
        found.setdefault((component, path), {})[part] = (key, tensor)

    lora, problems = {}, []
    for (component, path), parts in sorted(found.items()):
        module = models[component].get_submodule(path)
        if "down" not in parts or "up" not in parts:
            problems.append(f"{component}.{path}: has {sorted(parts)}, needs both down and up")
            continue
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        if isinstance(module, nn.Conv2d) and down.ndim == 2:  # a Linear-style LoRA on a 1x1 conv (SD1's proj_in)
            down, up = down[:, :, None, None], up[:, :, None, None]
        problem = _shape_problem(module, down, up)
        if problem:
            problems.append(f"{down_key}: {problem}")
            continue
        alpha = float(parts["alpha"][1]) if "alpha" in parts else None
        lora.setdefault(component, {})[path] = LoRAWeights(down, up, alpha)

    if unknown or unmatched or problems:
        lines = [f"the LoRA in {source} does not fit this pipeline (nothing was loaded):"]
        if unknown:
            lines.append(listed("keys are in no known LoRA format (diffusers/peft, attention processors, kohya)",
                                unknown))
        if unmatched:
            lines.append(listed("keys name modules this pipeline does not have (a LoRA for another base model?)",
                                unmatched))
        if problems:
            lines.append(listed("modules do not fit their LoRA weights", problems))
        raise SingleFileError("\n".join(lines))
    if not lora:
        raise SingleFileError(f"{source} holds no LoRA weights")
    return lora


def _shape_problem(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    if down.shape[0] != up.shape[1]:
        return f"rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ"
    if isinstance(module, nn.Linear):
        want_down, want_up = (down.shape[0], module.in_features), (module.out_features, up.shape[1])
    else:
        want_down = (down.shape[0], module.in_channels, *module.kernel_size)  # LoCon: down has the conv's kernel
        want_up = (module.out_channels, up.shape[1], 1, 1)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return (f"down {tuple(down.shape)} / up {tuple(up.shape)} do not fit {type(module).__name__} "
                f"(needs {want_down} / {want_up})")
    return None
