"""The UNet call as a replayed CUDA graph: one launch per denoising step instead of about a thousand.

Replaces: the eager `pare/models/unet_2d_condition.py UNet2DConditionModel.forward` inside a
pipeline's loop, on CUDA (`unet.py GraphedUNet2DConditionModel` is that UNet; this file holds the caches). In
eager mode SD's UNet is bound by the CPU launching its kernels (see the README's benchmarks); a graph, captured once
per input signature, replays all of them.

The cache key holds everything the captured kernels depend on but their input values and weights:
every input's shape, dtype, device and strides; the non-tensor arguments; and the state of LoRA
hooks (`pare/lora/layers.py`), whose adapters and scales a captured graph would otherwise keep.

The weights are checked at every call instead. When any parameter moved or was replaced (`.to()`,
`load_state_dict(assign=True)`: its data pointer or dtype changed), or a submodule was swapped for
another, every graph of the old weights is dropped and the call runs eagerly; a capture is made only
once the weights are seen twice at the same place. So replaced weights are never replayed stale, and
weights cast anew at every call (the VAE's float32 upcast of SDXL) cost no capture per call. In-place
changes to weights (fusing a LoRA, loading a state dict) are seen by a replay: it reads the same memory.
Forward hooks on a submodule (other than LoRA's, which the key follows) must run, and a replay would
skip them: while there are any, the call runs eagerly, with a warning once. Hooks on the module itself
(`pare bench`'s stage timers) run around the replay, as around any call.

The inputs are checked to be finite before the replay, as the eager UNet checks them, but a tensor
already checked (the same object, unchanged since: its version counter) is not read again. That
check is a host read, which makes the CPU wait for the GPU; the prompt's embeddings and the schedule
(each step's timestep is one of its elements) are the same tensors at every step, so a denoising
loop pays it once, not once per step.

A pipeline's text encoders and its VAE's encoder and decoder are replayed the same way
(`graph_forward`): each is one call per image, but an eager call is bound by the CPU launching
its kernels (SD1.5's CLIP, a prompt and its negative, eager: 17.3 ms of a 338 ms image; see
benchmarks/NOTES.md). Their inputs need no finite check: token ids are integers, and
`AutoencoderKL.decode` / `encode` check theirs before the call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..validation import check_finite_inputs

logger = logging.getLogger(__name__)

# Hooks that only gather a submodule's outputs into the call's return value, so that a graph captures what they
# gather among its outputs and a replay refills it: transformers' output capturing (`output_hidden_states`), which
# it installs on CLIP's layers for good at the first such call.
REPLAY_SAFE_HOOKS = ("transformers.utils.output_capturing",)
HOOKS, PRE_HOOKS = operator.itemgetter("_forward_hooks"), operator.itemgetter("_forward_pre_hooks")  # of a module's __dict__


def _signature(leaf) -> tuple:
    if torch.is_tensor(leaf):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    return ("value", leaf)


def _lora_state(model: torch.nn.Module) -> tuple:
    hooks = getattr(model, "_pare_lora_hooks", None) or {}
    return tuple((path, h.enabled, h.original_weight is not None, tuple(sorted(h.active.items())))
                 for path, h in sorted(hooks.items()))


class GraphCache:
    """`fn(**kwargs)` captured as a CUDA graph per input signature; calls copy inputs in and replay."""

    hooks_inside = False  # whether `fn` calls the model itself (its hooks fire inside a capture), not only its forward

    def __init__(self, fn, model: torch.nn.Module, warmup: int = 2):
        self.fn, self.model, self.warmup = fn, model, warmup
        self.graphs: dict = {}
        # One memory pool for all of this model's graphs, or all of a pipeline's (`share_pool`): a graph's
        # outputs are cloned out at once and its static outputs stay allocated, so the transient memory of
        # graphs replayed one after another (never at once) can be the same memory.
        self.pool = None
        self.what, self.eagerly = type(model).__name__, "it runs eagerly, not from its CUDA graph"  # for warnings
        self.params_at = None  # the hash of the weights' data pointers at the last call
        self.warned = False
        self.walk()

    def walk(self) -> None:
        """Record the module tree, walked once (model.parameters() visits every module: about 1 ms per call on
        SD1.5's UNet, measured): each parent-child link, and where each parameter lives. Per call the links and
        slots are read again, so that a submodule swapped for another, a parameter replaced by a new one
        (`load_state_dict(assign=True)`) and one whose data moved (`.to()`) are all seen.

        The per-call reads are `map`s over these lists with C functions (`dict.get`, `operator.is_not`,
        `Tensor.data_ptr`), not Python loops: on an H100 host, 0.21 ms a call for SD1.5's UNet loop in loops, 0.12 ms
        so (benchmarks/NOTES.md change 48), paid before each replay while the GPU waits."""
        modules = list(self.model.modules())
        links = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self.links = tuple(map(list, zip(*links))) if links else ([], [], [])  # (parents' dicts, names, children)
        # their hooks would run inside a graph, so a replay would skip them (the model's own too, where `fn` is more
        # than its forward: `hooks_inside`)
        self.inner = modules if self.hooks_inside else modules[1:]
        self.hook_dicts = [m.__dict__ for m in self.inner]  # where each keeps its hooks (`_forward_hooks`, ...)
        slots = [(m._parameters, name) for m in modules for name, p in m._parameters.items() if p is not None]
        self.slots = tuple(map(list, zip(*slots))) if slots else ([], [])  # (owners' dicts, names)

    def moved(self) -> bool:
        """Whether a link of the tree points elsewhere: a submodule was swapped for another."""
        parents, names, children = self.links
        return any(map(operator.is_not, map(dict.get, parents, names), children))

    def weights(self) -> int:
        """A hash of where the weights are (every parameter's data pointer) and of their dtype."""
        params = list(map(dict.get, *self.slots))
        try:
            pointers = tuple(map(torch.Tensor.data_ptr, params))
        except TypeError:  # a parameter set to None since the walk: walk again (a None is no weight)
            self.walk()
            return self.weights()
        return hash((pointers, params[0].dtype if params else None))

    def hooked(self) -> list[str]:
        """The submodules with forward hooks a replay would skip: all but LoRA's, which the key follows, and those
        of `REPLAY_SAFE_HOOKS`."""
        global_hooks = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
        if not (global_hooks or any(map(HOOKS, self.hook_dicts)) or any(map(PRE_HOOKS, self.hook_dicts))):
            return []  # the common case, read at C speed: no module has any hook
        lora = {id(h) for h in (getattr(self.model, "_pare_lora_hooks", None) or {}).values()}
        foreign = lambda hooks: any(id(getattr(h, "__self__", None)) not in lora  # noqa: E731
                                    and getattr(h, "__module__", None) not in REPLAY_SAFE_HOOKS for h in hooks.values())
        names = [type(m).__name__ for m in self.inner if (m._forward_hooks and foreign(m._forward_hooks))
                 or (m._forward_pre_hooks and foreign(m._forward_pre_hooks))]
        if global_hooks:
            names.append("every module (a global forward hook)")
        return names

    def key(self, leaves, spec) -> tuple:
        return (str(spec), tuple(_signature(l) for l in leaves), _lora_state(self.model), self.model.training)

    def capture(self, leaves, spec):
        static = [l.clone() if torch.is_tensor(l) else l for l in leaves]
        kwargs = tree_unflatten(static, spec)
        self.warm_up(kwargs, next(l for l in leaves if torch.is_tensor(l)).device)
        if self.pool is None:
            self.pool = self.model.__dict__.get("_pare_pool")
            self.pool = share_pool([self.model]) if self.pool is None else self.pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(**kwargs)
        return graph, static, out

    def warm_up(self, kwargs: dict, device: torch.device) -> None:
        """Run the call `warmup` times off the capture: Triton and cuDNN pick their kernels here."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(**kwargs)
        torch.cuda.current_stream(device).wait_stream(stream)

    def __call__(self, **kwargs):
        if self.moved():
            self.walk()  # a submodule was swapped for another: its weights are new ones
        hooked = self.hooked()
        if hooked:  # hooks must fire: a replay runs kernels, not Python
            if not self.warned:
                self.warned = True
                logger.warning("pare.fast: forward hooks on %s inside %s: %s, while they are there",
                               ", ".join(sorted(set(hooked))), self.what, self.eagerly)
            return self.fn(**kwargs)
        params = self.weights()
        if params != self.params_at:  # new weights (or the first call): the graphs of the old ones are stale
            first, self.params_at = self.params_at is None, params
            self.graphs.clear()
            if not first:
                return self.fn(**kwargs)  # capture only once the weights are seen twice at the same place
        leaves, spec = tree_flatten(kwargs)
        key = self.key(leaves, spec)
        if key not in self.graphs:
            self.graphs[key] = self.capture(leaves, spec)
        entry = self.graphs[key]
        if entry is None:  # a capture found this call not replayable (loop.py): eager for this key
            return self.fn(**kwargs)
        return self.replay(entry, leaves)

    def replay(self, entry, leaves):
        graph, static, out = entry[:3]
        for s, l in zip(static, leaves):
            if torch.is_tensor(l):
                s.copy_(l)
        graph.replay()
        return tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, out)


def check_finite_once(model: torch.nn.Module, **inputs) -> None:
    """`check_finite_inputs`, skipping the tensors it passed before unchanged; a view is judged by its base."""
    memo = model.__dict__.setdefault("_pare_finite", {})  # name -> (weak reference, version) of the last tensor passed
    bases = {k: (v._base if torch.is_tensor(v) and v._base is not None else v) for k, v in inputs.items()}
    fresh = {k: v for k, v in bases.items()
             if not (torch.is_tensor(v) and k in memo and memo[k][0]() is v and memo[k][1] == version(v))}
    check_finite_inputs(type(model).__name__, **fresh)
    memo.update({k: (weakref.ref(v), version(v)) for k, v in fresh.items() if torch.is_tensor(v) and version(v) is not None})


def version(t: torch.Tensor) -> int | None:
    """The in-place change counter of a tensor; None for an inference-mode tensor, which has none."""
    return None if t.is_inference() else t._version


def replayable(x) -> bool:
    """Whether a call on `x` may replay a graph: CUDA, no autograd, not inside a compile or another capture."""
    return (torch.is_tensor(x) and x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def share_pool(modules: list[torch.nn.Module]):
    """One CUDA graph memory pool for the graphs of `modules` (a pipeline's, which it calls one at a time):
    its footprint is then the largest graph's transient memory, not their sum. Returns the pool."""
    pool = torch.cuda.graph_pool_handle()
    for m in modules:
        m.__dict__["_pare_pool"] = pool
    return pool


def graph_forward(module: torch.nn.Module) -> None:
    """Replay `module`'s forward from CUDA graphs where `replayable`; eager elsewhere. Undo: `eager_forward`.

    The forward is set on the instance, so the module's own `__call__` (and the hooks it runs, such as the
    stage timers of `pare bench`) still brackets each call. A graphed call's first input (token ids, a map)
    may come by position or keyword; a call with more positional arguments runs eagerly.
    """
    eager = functools.partial(type(module).forward, module)
    name = list(inspect.signature(type(module).forward).parameters)[1]  # after self: input_ids, sample
    cache = GraphCache(eager, module)

    def forward(*args, **kwargs):
        x = args[0] if args else kwargs.get(name)
        if len(args) > 1 or not replayable(x):
            return eager(*args, **kwargs)
        if args:
            kwargs = {name: x, **kwargs}
        return cache(**kwargs)

    module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    module.__dict__["_pare_graphed"] = cache


def eager_forward(module: torch.nn.Module) -> None:
    """Undo `graph_forward`: the class's forward again, the graphs dropped."""
    if module.__dict__.pop("_pare_graphed", None) is not None:
        module.__dict__.pop("forward", None)
    module.__dict__.pop("_pare_pool", None)
