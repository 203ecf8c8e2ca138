"""The whole denoising loop as one CUDA graph: every step's UNet call, guidance and scheduler step in one replay.

Replaces: `pare/pipelines/stable_diffusion.py StableDiffusionPipeline.denoise` on CUDA, in the pipelines that run
that loop (text-to-image and image-to-image, SD 1.x / 2.x and SDXL). The loop is marked `reads_only_arguments`:
it reads nothing but its arguments, `self.unet` and `self.scheduler`, so a graph of it depends on nothing else.
ControlNet's and inpainting's loops read more (the condition image, the mask) and run step by step.

Why: with the UNet replayed from a graph per step (graph.py), the host still launches each step's guidance
arithmetic and scheduler step (about 15 small kernels) and copies the UNet's inputs in. One replay launches
the whole loop, and the kernels between the UNet calls run back to back. The host already ran ahead of the GPU,
so the gain is small: 3.7 ms of a 311 ms SD1.5 image, measured (benchmarks/NOTES.md, change 22).
The loop it runs is `denoise.py`'s: the class's loop, with a plain DDIM, Euler, Euler a, DPM-Solver++, UniPC, DEIS,
PLMS or LMS loop's guidance, step and next UNet input as one kernel a step (0.9 ms more off the SD1.5 image with DDIM,
change 30; changes 33, 34, 36, 37, 40, 43, 44, 46 and 47 for the others), its UNet told that the CFG batch's halves
are equal, and its text's K and V projected once (changes 31 and 32).

What a capture bakes in, so what its key holds (graph.py's GraphCache adds the rest: the UNet's weights, LoRA
state and hooks, the inputs' shapes):
- the schedule. Each step's timestep and sigma enter the scheduler's arithmetic as host numbers (pare's
  schedulers read the schedule on the host: `scheduling_utils.schedule_value`), so the key holds the
  scheduler's class and its state after `set_timesteps`, tensors by value, and the timesteps the loop walks
  (img2img walks the schedule's tail);
- guidance_scale, guidance_rescale and the step's keyword arguments (eta): Python numbers.
A scheduler whose `set_timesteps` leaves a flag as a loop left it (`is_scale_input_called`) has one state when
fresh and another after its first loop: two keys, so a second capture at its second call, then replays.
Copied in at each replay: the starting latents, the prompt embeddings, SDXL's added conditions and the noise drawn
for it.

A loop that draws noise (ancestral and SDE samplers, DDIM with eta > 0, DDPM) replays too. A key's first call warms
up for its capture, and the warm-up records the ops it runs (a dispatch mode) and the draws its scheduler makes
(`noise.py`), leaving the random generators as it found them. The captured loop reads its noise from an input; before
each replay the same draws are made from that call's generator, in the order the stepping loop would make them,
and copied in.

Where the loop runs step by step instead (the UNet still replays its own graph at each step):
- with a `callback_on_step_end`: it must see, and may replace, each step's tensors;
- a loop that draws random numbers other than through its scheduler's `randn_tensor`, or from a generator the call
  did not pass (the warm-up sees either), or draws of two shapes or dtypes;
- a scheduler whose step a capture does not allow (it reads a value back from the GPU, or copies a tensor from
  the host): the warm-up sees that too, a warning says so once per key, and that key runs step by step.
  A capture that fails all the same raises, naming `loop_graph=False`: after a failed capture the CUDA state
  is not to be trusted, so there is no quiet fallback from there;
- forward hooks on the UNet or inside it: they must fire at every step.

The scheduler's Python state after a replay is what the captured run left (its step index, its history of
model outputs), as after an eager loop. The inputs are checked finite once, at the loop's start: a value that
turns non-finite inside the loop is not caught at its step but by the VAE's decode, which checks its input.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..schedulers.scheduling_utils import host_schedule, host_values
from .denoise import denoise as fused_denoise
from .graph import GraphCache, check_finite_once, replayable
from .noise import Tape, draw_ahead, drawing_from

logger = logging.getLogger(__name__)

# aten ops that draw random numbers, by name without the in-place "_" and the "_like" of their variants
RANDOM_OPS = ("randn", "rand", "randint", "randperm", "normal", "uniform", "bernoulli", "multinomial",
              "exponential", "geometric", "cauchy", "log_normal", "poisson")
# aten ops that read a CUDA tensor's values back to the host (a capture cannot hold them)
HOST_READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2")


class NotReplayable(Exception):
    """A loop a graph cannot stand for (it draws random numbers, or reads the GPU back): it runs step by step."""


class Recorder(TorchDispatchMode):
    """While active, lists the ops that drew random numbers (but a `tape`'s own draws), and those that a capture does
    not allow: a read of a CUDA tensor's values on the host (`.item()`, `bool()`, `nonzero`) and a copy between the
    host and the GPU (a tape's draws included: a CPU generator's noise is copied in)."""

    def __init__(self, tape: Tape | None = None):
        super().__init__()
        self.tape = tape
        self.drew: list[str] = []
        self.synced: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        taped = self.tape is not None and self.tape.drawing
        if taped:  # the draw a replay takes from its tape, and its copy in
            return func(*args, **kwargs)
        if name.rstrip("_").removesuffix("_like") in RANDOM_OPS:
            self.drew.append(str(func))
        tensors = [a for a in args if torch.is_tensor(a)]
        devices = {t.device.type for t in tensors} | ({torch.device(kwargs["device"]).type}
                                                       if kwargs.get("device") is not None else set())
        if (name in HOST_READS and "cuda" in devices) or (name in ("_to_copy", "copy_") and len(devices) > 1):
            self.synced.append(str(func))
        return func(*args, **kwargs)


class RandomStates:
    """The generators a warm-up may draw from (the step's own, torch's CPU and CUDA defaults), saved to restore."""

    def __init__(self, step_kwargs: dict | None, device: torch.device):
        self.device = device
        self.generators = [(g, g.get_state()) for g in tree_leaves(step_kwargs or {}) if isinstance(g, torch.Generator)]
        self.cpu, self.cuda = torch.get_rng_state(), torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        for g, saved in self.generators:
            g.set_state(saved)
        torch.set_rng_state(self.cpu)
        torch.cuda.set_rng_state(self.cuda, self.device)


def value_key(v):
    """A hashable stand-in for a scheduler attribute, by value (a CUDA tensor is read to the host, unless `set_timesteps`
    kept its host copy: `host_values`). TypeError for anything else: such a scheduler runs step by step."""
    if torch.is_tensor(v):
        kept = host_values(v) if v.is_cuda else None
        host = (v.detach() if kept is None else kept).reshape(-1).cpu()
        return ("tensor", str(v.dtype), tuple(v.shape), v.device.type, host.view(torch.uint8).numpy().tobytes())
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(value_key(x) for x in v)
    if isinstance(v, (set, frozenset)):
        return ("set",) + tuple(sorted(map(repr, v)))
    if isinstance(v, dict):
        return tuple((k, value_key(x)) for k, x in sorted(v.items(), key=lambda kv: str(kv[0])))
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    raise TypeError(f"a scheduler attribute of type {type(v).__name__}")


def state(scheduler) -> dict:
    """The scheduler's attributes, its lists (of past model outputs, say) copied, not shared."""
    return copied(vars(scheduler))


def set_state(scheduler, saved: dict) -> None:
    vars(scheduler).clear()
    vars(scheduler).update(copied(saved))


def copied(attributes: dict) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in attributes.items()}


def loop_key(scheduler, timesteps: torch.Tensor, step_kwargs: dict | None, guidance_scale: float,
             guidance_rescale: float) -> tuple:
    """Everything a captured loop bakes in but the UNet's weights and the inputs' shapes (GraphCache keys those): the
    scheduler (`schedule_key`), the timesteps the loop walks (img2img walks the tail of the schedule: its strength
    picks how much), and the guidance numbers."""
    return schedule_key(scheduler, step_kwargs), value_key(timesteps), float(guidance_scale), float(guidance_rescale)


def schedule_key(scheduler, step_kwargs: dict | None) -> tuple:
    """What a captured loop's scheduler arithmetic depends on: its class and state (not `_host_*` caches), and the
    step's numbers. A generator is keyed by its presence: a loop that draws from it is never replayed."""
    attributes = {k: v for k, v in vars(scheduler).items() if not k.startswith("_host")}
    steps = {k: ("generator",) if isinstance(v, torch.Generator) else v for k, v in (step_kwargs or {}).items()}
    return type(scheduler), value_key(attributes), value_key(steps)


def prime(scheduler) -> None:
    """Read the schedule to the host before a capture, which cannot: the scheduler keeps the copy
    (`pare/schedulers/scheduling_utils.py host_schedule`) and reads its timesteps there."""
    ts = getattr(scheduler, "timesteps", None)
    if torch.is_tensor(ts) and ts.ndim == 1 and not ts.is_inference():
        host_schedule(scheduler)


class Loop:
    """The loop's arguments that are not tensors to copy in: baked into a capture, so compared by `key`."""

    def __init__(self, timesteps, guidance_scale, guidance_rescale, step_kwargs, key):
        self.timesteps, self.guidance_scale, self.guidance_rescale = timesteps, guidance_scale, guidance_rescale
        self.step_kwargs, self.key = step_kwargs, key

    def __eq__(self, other):
        return isinstance(other, Loop) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


class LoopGraphs(GraphCache):
    """A pipeline's denoising loop captured as one CUDA graph per key; other keys run step by step."""

    hooks_inside = True  # the loop calls the UNet: its own hooks fire inside the capture, too

    def __init__(self, pipe):
        self.pipe, self.start, self.warmed = pipe, None, False  # start: the state a capture's runs each begin from
        super().__init__(self.run, pipe.unet, warmup=1)  # once per `warm_up` run: see there
        self.what, self.eagerly = f"{type(pipe).__name__}'s denoising loop", "it runs step by step"
        self.tape: Tape | None = None  # the draws a warm-up records, or a capture plays (noise.py)

    def run(self, latents, prompt_embeds, added_cond_kwargs, loop: Loop):
        if self.start is not None:  # in a capture: its warm-up and the capture start where set_timesteps left it
            set_state(self.pipe.scheduler, self.start)
        if self.tape is not None:
            self.tape.rewind()
        with drawing_from(self.pipe.scheduler, self.tape):  # the noise a capture reads, or a warm-up records
            return fused_denoise(self.pipe, latents, loop.timesteps, prompt_embeds, loop.guidance_scale,
                                 loop.guidance_rescale, loop.step_kwargs, added_cond_kwargs)

    def warm_up(self, kwargs: dict, device: torch.device) -> None:
        """Two runs. The first may capture the UNet's per-step graphs and check its inputs, which read the GPU; the
        second replays them, as a capture of the loop will not: its ops are recorded and judged for reads and
        draws, and the scheduler's draws are recorded (`noise.py Tape`): where there are some, the capture reads them
        from a buffer that each replay fills."""
        loop = kwargs["loop"]
        rng = RandomStates(loop.step_kwargs, device)
        tape = Tape((loop.step_kwargs or {}).get("generator"))
        try:
            super().warm_up(kwargs, device)
            self.tape = tape
            with Recorder(tape) as second:
                super().warm_up(kwargs, device)
        finally:
            self.tape = None
            rng.restore()
        if second.drew:  # drawn other than by the scheduler's randn_tensor
            raise NotReplayable(f"it draws random numbers ({second.drew[0]})")
        if tape.foreign:
            raise NotReplayable(f"it draws noise the loop cannot draw ahead ({tape.foreign})")
        if second.synced:
            logger.warning("pare.fast: %s with %s runs step by step: a step reads the GPU back to the host or copies "
                           "between them (%s), which a CUDA graph cannot hold", self.what,
                           type(self.pipe.scheduler).__name__, second.synced[0])
            raise NotReplayable(f"it reads the GPU ({second.synced[0]})")
        if tape.specs:  # the capture reads its noise from an input, which each replay fills (`replay`)
            self.tape = tape.played()
        self.warmed = True

    def capture(self, leaves, spec):
        scheduler = self.pipe.scheduler
        prime(scheduler)
        self.start, self.warmed = state(scheduler), False
        try:
            graph, static, out = super().capture(leaves, spec)
            # and the state the captured run left, and the tape its noise is read from
            entry = (graph, static, out, state(scheduler), self.tape)
        except NotReplayable as e:
            logger.debug("pare.fast: %s runs step by step: %s", self.what, e)
            entry = None
        except RuntimeError as e:
            if not self.warmed:  # the loop itself failed, as it would have stepping: its own error
                raise
            # the capture failed on what the warm-up did not see: the CUDA state after it is not to be trusted
            raise RuntimeError(f"pare.fast: capturing {self.what} with {type(scheduler).__name__} as one CUDA graph "
                               f"failed ({str(e).splitlines()[0]}); run it with enable_fast(loop_graph=False)") from e
        finally:
            set_state(scheduler, self.start)  # as set_timesteps left it: the step-by-step run may follow
            self.start, self.tape = None, None
        return entry

    def replay(self, entry, leaves):
        tape = entry[4]
        if tape is not None:  # this call's noise, drawn as its stepping loop would draw it
            loop = next(leaf for leaf in leaves if isinstance(leaf, Loop))
            tape.play.copy_(draw_ahead(tape.specs, (loop.step_kwargs or {}).get("generator")))
        out = super().replay(entry, leaves)
        set_state(self.pipe.scheduler, entry[3])
        return out


def graph_denoise(pipe) -> bool:
    """Replay `pipe.denoise` from one CUDA graph per loop where it can be; step by step elsewhere. Undo:
    `step_denoise`. Returns whether the pipeline's loop can be graphed (`reads_only_arguments`)."""
    loop = type(pipe).denoise
    if not getattr(loop, "reads_only_arguments", False):
        return False

    def denoise(latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                step_kwargs: dict | None = None, added_cond_kwargs: dict | None = None, callback=None,
                callback_inputs=("latents",)):
        args = (latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale, step_kwargs, added_cond_kwargs)
        if callback is not None or not replayable(latents) or not torch.is_tensor(timesteps):
            return fused_denoise(pipe, *args, callback=callback, callback_inputs=callback_inputs)  # step by step
        try:
            key = loop_key(pipe.scheduler, timesteps, step_kwargs, guidance_scale, guidance_rescale)
        except TypeError:
            return loop(pipe, *args)
        cache = pipe.__dict__.get("_pare_loop")
        if cache is None or cache.model is not pipe.unet:  # a new UNet: a new cache
            cache = pipe.__dict__["_pare_loop"] = LoopGraphs(pipe)
        check_finite_once(pipe.unet, latents=latents, encoder_hidden_states=prompt_embeds,
                          **(added_cond_kwargs or {}))
        out = cache(latents=latents, prompt_embeds=prompt_embeds, added_cond_kwargs=added_cond_kwargs,
                    loop=Loop(timesteps, guidance_scale, guidance_rescale, step_kwargs, key))
        for _ in pipe.progress_bar(range(len(timesteps))):  # the bar a step-by-step loop shows, at once
            pass
        return out

    pipe.denoise = denoise  # an instance attribute, found before the class's method
    return True


def step_denoise(pipe) -> None:
    """Undo `graph_denoise`: the class's loop again, its graphs dropped."""
    pipe.__dict__.pop("denoise", None)
    pipe.__dict__.pop("_pare_loop", None)
