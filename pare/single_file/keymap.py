"""The engine that reads a key-map table: diffusers name <-> original (LDM / OpenCLIP) name.

A table is a list of rows `(diffusers prefix pattern, original prefix template, parts)`:

- the pattern names integers in braces (`down_blocks.{b}.resnets.{l}`); they are matched in a
  diffusers key, and the map's `fields(groups, config)` turns them into the template's fields
  (the LDM block index `{n}` of down block b, layer l, for example);
- `parts` renames what follows the prefix (`norm1` -> `in_layers.0`); a part may name a reshape;
- the first row whose pattern matches the start of a key wins; a key no row matches is an error
  (a bug in the table, never the file's fault).

A reshape is one of `RESHAPES`:

    linear_as_conv1x1   diffusers (out, in) Linear  <-> original (out, in, 1, 1) 1x1 conv  (VAE attention)
    transpose           diffusers (out, in) Linear  <-> original (in, out) matrix used as x @ W (OpenCLIP)
    qkv0, qkv1, qkv2    diffusers q/k/v_proj        <-> one third of OpenCLIP's fused in_proj, dim 0

The same `Name` serves both directions: loading reads and reshapes, saving reshapes back and
concatenates the three thirds of a fused `in_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

RESHAPES = (None, "linear_as_conv1x1", "transpose", "qkv0", "qkv1", "qkv2")


@dataclass(frozen=True)
class Name:
    """Where one diffusers tensor lives in the original file, and how it is reshaped there."""

    original: str
    reshape: str | None = None


@dataclass(frozen=True)
class KeyMap:
    """One component's table (`rows`) and the function that computes template fields from a match."""

    rows: list[tuple[str, str, dict]]
    fields: Callable[[dict, dict], dict] = lambda groups, config: groups

    def compiled(self):
        out = []
        for pattern, template, parts in self.rows:
            regex = re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")
            regex = re.sub(r"\{(\w+)\}", r"(?P<\1>\\d+)", regex)
            out.append((re.compile(regex + r"(?:\.|$)"), template, parts))
        return out

    def names(self, diffusers_keys, config: dict) -> dict[str, Name]:
        """diffusers key -> `Name` in the original file, for every key of a model's state dict."""
        compiled, names = self.compiled(), {}
        for key in diffusers_keys:
            for regex, template, parts in compiled:
                match = regex.match(key)
                if match is None:
                    continue
                groups = {k: int(v) for k, v in match.groupdict().items()}
                prefix = template.format(**self.fields(groups, config))
                rest = key[len(match.group(0)):]
                names[key] = _rename_part(prefix, rest, parts)
                break
            else:
                raise KeyError(f"pare's key map has no row for the diffusers key {key!r} (a bug in pare/single_file)")
        return names


def _rename_part(prefix: str, rest: str, parts: dict) -> Name:
    # The longest part that `rest` starts with, so that `to_out.0` wins over `to_out`.
    for part in sorted(parts, key=len, reverse=True):
        if rest == part or rest.startswith(part + "."):
            new = parts[part]
            new, reshape = (new, None) if isinstance(new, str) else new
            tail = rest[len(part):]
            if reshape == "linear_as_conv1x1" and not tail.endswith("weight"):
                reshape = None  # biases are the same vector in both layouts
            return Name(".".join(p for p in (prefix, new + tail) if p), reshape)
    return Name(".".join(p for p in (prefix, rest) if p))


def to_diffusers(tensor: torch.Tensor, reshape: str | None) -> torch.Tensor:
    """An original tensor -> its diffusers shape."""
    if reshape is None:
        return tensor
    if reshape == "linear_as_conv1x1":
        return tensor[:, :, 0, 0] if tensor.ndim == 4 else tensor  # (out, in, 1, 1) -> (out, in)
    if reshape == "transpose":
        return tensor.T.contiguous()  # (in, out) -> (out, in)
    third = int(reshape[-1])
    width = tensor.shape[0] // 3  # in_proj: (3 * D, D) -> q, k, v each (D, D); bias (3 * D,) -> (D,)
    return tensor[third * width:(third + 1) * width].clone()


def to_original(tensors: list[tuple[str | None, torch.Tensor]]) -> torch.Tensor:
    """The diffusers tensor(s) that make one original tensor -> that tensor (q, k, v concatenated for in_proj)."""
    if len(tensors) == 3 and all(r and r.startswith("qkv") for r, _ in tensors):
        ordered = [t for _, t in sorted(tensors, key=lambda rt: rt[0])]
        return torch.cat(ordered, dim=0)  # 3 x (D, ...) -> (3 * D, ...)
    (reshape, tensor), = tensors
    if reshape == "linear_as_conv1x1":
        return tensor[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
    if reshape == "transpose":
        return tensor.T.contiguous()
    return tensor
