"""Block-by-block parity: where, inside a whole model, does pare first part from the reference?

An end-to-end check says *that* two models disagree; this says *where*. Forward hooks on both
models (built with the same module tree, so the same module names) record every chosen
block's output during one forward pass on the same inputs; `compare` then judges each block,
and the rows come back in the order the blocks finished. A block finishes after the blocks
inside it, so the first failing row names the innermost block that went wrong, not the stage
around it.

Each block sees its *own* model's upstream activations, so a row measures the error
accumulated up to that block: rows are judged at the end-to-end tolerance by default.

No diffusers here: the two models are any already-built torch modules.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .compare import Comparison, compare


class BlockComparison(NamedTuple):
    rows: list[Comparison]  # one per block, in the order the blocks finished; the whole model last
    first_failure: Comparison | None  # the first row that failed, or None

    def __str__(self) -> str:
        lines = [f"{'PASS' if r.passed else 'FAIL'}  {r.name:<48} rel L2 {r.rel_l2:.2e}" +
                 ("" if r.pare_err64 is None else f"  err64 pare {r.pare_err64:.2e} ref {r.diffusers_err64:.2e}")
                 for r in self.rows]
        verdict = "all blocks within tolerance" if self.first_failure is None else f"first failure:\n{self.first_failure}"
        return "\n".join(lines + [verdict])


def block_names(model: nn.Module) -> list[str]:
    """The blocks of a model: its direct children, and every item of a ModuleList held by a block, recursively.

    For a UNet: conv_in, time_embedding, down_blocks.0, down_blocks.0.resnets.0,
    down_blocks.0.attentions.0, down_blocks.0.attentions.0.transformer_blocks.0, ..., mid_block,
    up_blocks.N..., conv_out. Layers inside a block (its convs, norms, attn1) are not blocks, nor
    are torch's own layers held in a ModuleList (attention's `to_out.0` Linear and `to_out.1` Dropout).
    """
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList):
                for index, item in child.named_children():
                    if type(item).__module__.startswith("torch.nn"):
                        continue
                    names.append(f"{prefix}{name}.{index}")
                    visit(item, f"{prefix}{name}.{index}.")
            elif not prefix:  # direct children of the model
                names.append(name)
                visit(child, f"{name}.")

    visit(model, "")
    return names


def _output_tensor(output: Any) -> torch.Tensor | None:
    """A block's main output: the tensor itself, the first of a tuple (down blocks), or `.sample`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _output_tensor(output[0])
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float64(v) for k, v in value.items()}
    return value


@torch.no_grad()
def record_blocks(model: nn.Module, names: list[str], args: tuple = (), kwargs: dict | None = None,
                  output_name: str | None = None) -> dict:
    """Run `model(*args, **kwargs)` once; return {block name: output tensor} in the order the blocks finished.

    The whole model's output is recorded last, under `output_name` (default: the model's class
    name). A block run twice gets `name#2`, `name#3` for its later calls.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no modules named {missing}")
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            tensor = _output_tensor(output)
            if tensor is None or not tensor.is_floating_point():
                return
            key, calls = name, 1
            while key in outputs:
                calls += 1
                key = f"{name}#{calls}"
            outputs[key] = tensor.detach()
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        final = model(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    outputs[output_name or type(model).__name__] = _output_tensor(final).detach()
    return outputs


def compare_blocks(
    model: nn.Module,
    reference: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    names: list[str] | None = None,
    reference64: nn.Module | None = None,
    scope: str = "end_to_end",
) -> BlockComparison:
    """Run `model` (pare) and `reference` (diffusers) on the same inputs; compare every block's output.

    `names`: the blocks to hook (default: `block_names(model)`). `reference64`: optionally a
    float64 copy of the reference, run on the inputs cast to float64, for the error budget that
    judges fp16 and bf16 runs. The whole model's output is the last row, under the model's class name.
    """
    names = block_names(model) if names is None else list(names)
    whole = type(model).__name__
    ours = record_blocks(model, names, args, kwargs, whole)
    theirs = record_blocks(reference, names, args, kwargs, whole)
    exact = None
    if reference64 is not None:
        exact = record_blocks(reference64, names, _to_float64(args), _to_float64(kwargs), whole)

    unmatched = sorted(set(ours) ^ set(theirs))
    if unmatched:
        raise ValueError(f"these blocks ran in only one of the two models (differently structured forward passes?): "
                         f"{unmatched}")
    rows = [
        compare(name, out, theirs[name], None if exact is None else exact[name], scope=scope)
        for name, out in ours.items()
    ]
    return BlockComparison(rows, next((r for r in rows if not r.passed), None))
