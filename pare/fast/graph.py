"""The UNet call as a replayed CUDA graph: one launch per denoising step instead of about a thousand.

Replaces: the eager `pare/models/unet_2d_condition.py UNet2DConditionModel.forward` inside a
pipeline's loop, on CUDA. In eager mode SD's UNet is bound by the CPU launching its kernels
(see the README's benchmarks); a graph, captured once per input signature, replays all of them.

The cache key holds everything the captured kernels depend on but their input values: every
input's shape, dtype, device and strides; the non-tensor arguments; the identity (data pointer)
of every parameter, so that replaced weights (`.to()`, `load_state_dict(assign=True)`) are never
replayed stale; and the state of LoRA hooks (`pare/lora/layers.py`), whose adapters and scales a
captured graph would otherwise keep. (A submodule swapped for a new one after the first call is not
seen: call `pare.fast.optimize` again, which starts a new cache.) In-place changes to weights (fusing a LoRA, loading a state
dict) are seen by a replay: it reads the same memory. The inputs are checked to be finite before
the replay, as the eager UNet checks them, but a tensor already checked (the same object, unchanged
since: its version counter) is not read again. That check is a host read, which makes the CPU wait
for the GPU; the prompt's embeddings and the schedule (each step's timestep is one of its elements)
are the same tensors at every step, so a denoising loop pays it once, not once per step.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..models.unet_2d_condition import UNet2DConditionModel
from ..validation import check_finite_inputs


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

    def __init__(self, fn, model: torch.nn.Module, warmup: int = 2):
        self.fn, self.model, self.warmup = fn, model, warmup
        self.graphs: dict = {}
        self.pool = None  # one memory pool for all of this model's graphs: outputs are cloned out at once
        # The parameter list, walked once: model.parameters() visits every module (about 1 ms per call on
        # SD1.5's UNet, measured); the data pointers of this list are read per call (about 50 us).
        self.params = list(model.parameters())

    def key(self, leaves, spec) -> tuple:
        params = hash(tuple(p.data_ptr() for p in self.params))
        return (str(spec), tuple(_signature(l) for l in leaves), params, _lora_state(self.model), self.model.training)

    def capture(self, leaves, spec):
        static = [l.clone() if torch.is_tensor(l) else l for l in leaves]
        kwargs = tree_unflatten(static, spec)
        device = next(l for l in leaves if torch.is_tensor(l) and l.is_cuda).device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture: Triton and cuDNN pick their kernels here
            for _ in range(self.warmup):
                self.fn(**kwargs)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(**kwargs)
        return graph, static, out

    def __call__(self, **kwargs):
        leaves, spec = tree_flatten(kwargs)
        key = self.key(leaves, spec)
        if key not in self.graphs:
            self.graphs[key] = self.capture(leaves, spec)
        graph, static, out = self.graphs[key]
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


class GraphedUNet2DConditionModel(UNet2DConditionModel):
    """The UNet, replayed from CUDA graphs where it can be (CUDA, no autograd); eager elsewhere."""

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        eager = functools.partial(UNet2DConditionModel.forward, self)
        if (not sample.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.cuda.is_current_stream_capturing()):
            return eager(sample, timestep, encoder_hidden_states, **kwargs)
        check_finite_once(self, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          timestep_cond=kwargs.get("timestep_cond"), **(kwargs.get("added_cond_kwargs") or {}))
        if not torch.is_tensor(timestep):  # a Python number would be baked into the graph: make it an input
            timestep = torch.tensor(timestep)
        timestep = timestep.to(sample.device)
        if "_pare_graphs" not in self.__dict__:
            self.__dict__["_pare_graphs"] = GraphCache(eager, self)
        return self.__dict__["_pare_graphs"](sample=sample, timestep=timestep,
                                             encoder_hidden_states=encoder_hidden_states, **kwargs)
