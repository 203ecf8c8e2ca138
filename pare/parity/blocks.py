"""Block-by-block parity: where, inside a whole model, does pare first part from the reference?

An end-to-end check says *that* two models disagree; this says *where*, in two views:

- **local** (judged at block tolerance): a forward pre-hook captures the inputs (args and
  kwargs) that each reference block receives, and pare's twin block (same name in pare's
  module tree) runs on exactly those inputs. The row then measures that block's *own* error,
  not the error that reached it, so the first failing local row names the edited block.
- **accumulated** (judged at end-to-end tolerance): each model runs on its own upstream
  activations, as in real use. This is the drift through depth, worth seeing in fp16.

Rows come in the order the reference's blocks finished. A block finishes after the blocks
inside it, so a failure is named at the innermost block that shows it. Below float32 a float64
copy of the reference runs both views too, so that each side's error against float64 (err64)
can be judged by the budget of `tolerances.py`.

No diffusers here: the two models are any already-built torch modules with one module tree.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from .compare import Row, compare

DEPTHS = ("blocks", "all")  # `pare parity --depth`


class BlockComparison(NamedTuple):
    rows: list[Row]  # one per block call, in the order the reference's blocks finished; the whole model last
    first_failure: Row | None  # the first row whose own (local) error fails; else the first accumulated failure

    def __str__(self) -> str:
        lines = [f"{'PASS' if r.passed else 'FAIL'}  {r.name:<48} local rel L2 {r.local.rel_l2:.2e}" +
                 ("" if r.accumulated is None else f"  accumulated {r.accumulated.rel_l2:.2e}") for r in self.rows]
        verdict = "all blocks within tolerance" if self.first_failure is None else f"first failure:\n{self.first_failure}"
        return "\n".join(lines + [verdict])


def first_failure(rows: list[Row]) -> Row | None:
    """The row that names a bug: the first whose own error fails; failing that, the first whose drift fails."""
    return next((r for r in rows if not r.local.passed), None) or next((r for r in rows if not r.passed), None)


def block_names(model: nn.Module, depth: str = "blocks") -> list[str]:
    """The modules that get a row.

    depth="blocks": the model's direct children, and every item of a ModuleList held by a block,
    recursively. For a UNet: conv_in, time_embedding, down_blocks.0, down_blocks.0.resnets.0,
    down_blocks.0.attentions.0, down_blocks.0.attentions.0.transformer_blocks.0, ..., mid_block,
    up_blocks.N..., conv_out. torch's own layers held in a ModuleList (attention's `to_out.0`) are not blocks.

    depth="all": every module down to the leaves (attention, GEGLU/FeedForward, norms, projections,
    convs), so that an edit is named at the module it lives in. Containers (ModuleList,
    Sequential) and torch's parameter-free layers (SiLU, Dropout, Identity) inside a block carry
    no code of either library and get no row.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth={depth!r} is unknown; expected one of {DEPTHS}")
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
    if depth == "all":  # the blocks, and every module inside them that holds code or weights
        blocks = set(names)
        return [n for n, m in model.named_modules() if n in blocks or (n and not _is_torch_plumbing(m))]
    return names


def _is_torch_plumbing(module: nn.Module) -> bool:
    if isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
        return True
    return type(module).__module__.startswith("torch.nn") and not any(True for _ in module.parameters(recurse=False))


def _output_tensor(output: Any) -> torch.Tensor | None:
    """A block's main output: the tensor itself, the first of a tuple (down blocks), or `.sample`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _output_tensor(output[0])
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _to_float64(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.double() if t.is_floating_point() else t)


def _snapshot(value: Any) -> Any:
    """Copies of the tensors a block is called with: the block (or a later one) may change them in place."""
    return _map_tensors(value, lambda t: t.detach().clone())


def twin_call(ours: nn.Module, theirs: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The reference's call `theirs(*args, **kwargs)`, re-bound by argument name to pare's twin's `forward`.

    diffusers' blocks take arguments pare's leave out (`cross_attention_kwargs`, `return_dict`,
    `*args, **kwargs` for deprecated `scale`). Those may be dropped only while they hold their
    default (None, empty, the signature's default): a value pare would ignore is an error, since
    the two blocks would then not compute the same thing.
    """
    # The classes' forward, not the instances': a test may wrap an instance's forward in a lambda.
    signature = _forward_signature(theirs)
    ours_params = _forward_signature(ours).parameters
    given = []  # (name, value, default) of every argument diffusers' call binds, **kwargs spelled out
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        param = signature.parameters[name]
        if param.kind == param.VAR_KEYWORD:
            given += [(k, v, inspect.Parameter.empty) for k, v in value.items()]
        elif param.kind == param.VAR_POSITIONAL:
            given += [(f"*{name}[{i}]", v, inspect.Parameter.empty) for i, v in enumerate(value)]
        else:
            given.append((name, value, param.default))
    call = {}
    for name, value, default in given:
        if name in ours_params:
            call[name] = value
        elif name == "return_dict" or value is None or value is default or (isinstance(value, (tuple, dict)) and not value):
            continue
        else:
            raise ValueError(f"diffusers calls {type(theirs).__name__} with {name}={value!r}, which pare's "
                             f"{type(ours).__name__}.forward does not take: the two blocks cannot be compared on it")
    return call


def _forward_signature(module: nn.Module) -> inspect.Signature:
    signature = inspect.signature(type(module).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self


def _check_names(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no modules named {missing}")
    return modules


def _call_key(outputs: dict, name: str) -> str:
    """`name` for a block's first call, `name#2`, `name#3` for later ones."""
    key, calls = name, 1
    while key in outputs:
        calls += 1
        key = f"{name}#{calls}"
    return key


@torch.no_grad()
def record_blocks(model: nn.Module, names: list[str], args: tuple = (), kwargs: dict | None = None,
                  output_name: str | None = None) -> dict:
    """Run `model(*args, **kwargs)` once; return {block name: output tensor} in the order the blocks finished.

    The whole model's output is recorded last, under `output_name` (default: the model's class
    name). A block run twice gets `name#2`, `name#3` for its later calls.
    """
    modules = _check_names(model, names)
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            tensor = _output_tensor(output)
            if tensor is not None and tensor.is_floating_point():
                outputs[_call_key(outputs, name)] = tensor.detach()
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        final = model(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    outputs[output_name or type(model).__name__] = _output_tensor(final).detach()
    return outputs


@torch.no_grad()
def replay_blocks(model: nn.Module, reference: nn.Module, names: list[str], args: tuple = (),
                  kwargs: dict | None = None, reference64: nn.Module | None = None,
                  output_name: str | None = None) -> dict:
    """Run `reference(*args, **kwargs)`; at each named block, run `model`'s twin block on the very inputs
    the reference block got (and `reference64`'s, cast to float64).

    Returns {block name: (pare's output, reference's output, float64 output or None)} in the order
    the reference's blocks finished; the whole model last, under `output_name`. Only the inputs of
    the blocks still running are held, so memory stays near one forward pass.
    """
    ref_modules = _check_names(reference, names)
    ours_modules = _check_names(model, names)
    exact_modules = _check_names(reference64, names) if reference64 is not None else None
    pending: dict[str, list] = {n: [] for n in names}  # inputs of the calls still running (a stack per block)
    outputs: dict[str, tuple] = {}

    def pre_hook_for(name: str):
        def pre_hook(module, hook_args, hook_kwargs):
            pending[name].append((_snapshot(hook_args), _snapshot(hook_kwargs)))
        return pre_hook

    def hook_for(name: str):
        def hook(module, hook_args, hook_kwargs, output):
            block_args, block_kwargs = pending[name].pop()
            theirs = _output_tensor(output)
            if theirs is None or not theirs.is_floating_point():
                return
            ours = ours_modules[name](**twin_call(ours_modules[name], module, block_args, block_kwargs))
            exact = None
            if exact_modules is not None:
                exact = _output_tensor(exact_modules[name](*_to_float64(block_args), **_to_float64(block_kwargs)))
            outputs[_call_key(outputs, name)] = (_output_tensor(ours).detach(), theirs.detach(), exact)
        return hook

    handles = []
    for n in names:
        handles.append(ref_modules[n].register_forward_pre_hook(pre_hook_for(n), with_kwargs=True))
        handles.append(ref_modules[n].register_forward_hook(hook_for(n), with_kwargs=True))
    try:
        final = reference(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    exact = None if reference64 is None else _output_tensor(reference64(*_to_float64(args), **_to_float64(kwargs or {})))
    ours = model(*args, **(kwargs or {}))
    outputs[output_name or type(model).__name__] = (_output_tensor(ours).detach(), _output_tensor(final).detach(), exact)
    return outputs


def compare_blocks(
    model: nn.Module,
    reference: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    names: list[str] | None = None,
    reference64: nn.Module | None = None,
    depth: str = "blocks",
) -> BlockComparison:
    """Run `model` (pare) and `reference` (diffusers) on the same inputs; compare every block, locally and accumulated.

    `names`: the blocks to compare (default: `block_names(model, depth)`). `reference64`: a float64
    copy of the reference, for the error budget that judges fp16 and bf16 runs. The whole model's
    output is the last row, under the model's class name.
    """
    names = block_names(model, depth) if names is None else list(names)
    whole = type(model).__name__
    local = replay_blocks(model, reference, names, args, kwargs, reference64, whole)
    ours = record_blocks(model, names, args, kwargs, whole)
    theirs = {name: pair[1] for name, pair in local.items()}
    exact = None
    if reference64 is not None:
        exact = record_blocks(reference64, names, _to_float64(args), _to_float64(kwargs), whole)

    unmatched = sorted(set(ours) ^ set(theirs))
    if unmatched:
        raise ValueError(f"these blocks ran in only one of the two models (differently structured forward passes?): "
                         f"{unmatched}")
    rows = [
        Row(name,
            local=compare(name, ours_local, theirs_out, exact_local, scope="block"),
            accumulated=compare(name, ours[name], theirs_out, None if exact is None else exact[name], scope="end_to_end"))
        for name, (ours_local, theirs_out, exact_local) in local.items()
    ]
    return BlockComparison(rows, first_failure(rows))
