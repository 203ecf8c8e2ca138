"""One boundary per entry point: config keys, pipeline arguments and images are checked before any work.

diffusers twin: none as one file. diffusers checks some keys where it uses them (deep inside model
construction, so a wrong type surfaces as an unrelated `TypeError`) and some pipeline arguments in
`check_inputs`; this module does both up front, as data:

- `CONFIG_RULES`: class name -> {config key: rule}. `check_config` runs it at the top of
  `ConfigMixin.resolve_config`, so `from_config` and `from_pretrained` refuse a wrong type or an
  out-of-range value naming the file, the key, the value and what is allowed. A class or key that
  has no rule is not checked here (the class's own code still checks what it branches on); add a
  class by adding its table.
- `ARGUMENT_RULES`: pipeline argument -> rule, run by `check_call_arguments` at the top of every
  pipeline `__call__`, before `check_inputs`: numbers must be numbers, finite, and in range.
- `check_embeddings`, `check_image`: tensor arguments whose shape must fit the models, images
  whose mode or size the VAE cannot take.

A rule is a small object with `problem(value) -> str | None` (what is wrong, or None) and
`allowed` (what would be accepted, for the message). Allowed choices come from the same tuples the
code branches on (`BETA_SCHEDULES`, `DOWN_BLOCKS`, ...), so the messages cannot go stale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# --- rules -----------------------------------------------------------------------------------


def _wrong_type(value) -> str:
    name = type(value).__name__
    return f"is {'an' if name[0] in 'aeiou' else 'a'} {name}"


WRONG_TYPE = ("is a ", "is an ")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int:
    """An int (not a bool, not 4.0) in [min, max]."""

    min: int | None = None
    max: int | None = None
    odd: bool = False

    @property
    def allowed(self) -> str:
        if self.min is not None and self.max is not None:
            span = f"an int in [{self.min}, {self.max}]"
        elif self.min == 1:
            span = "a positive int"
        elif self.min == 0:
            span = "a non-negative int"
        elif self.min is not None:
            span = f"an int >= {self.min}"
        else:
            span = "an int"
        return span.replace("an int", "an odd int").replace("a positive int", "a positive odd int") if self.odd else span

    def problem(self, value) -> str | None:
        if not _is_int(value):
            return _wrong_type(value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            return "is out of range"
        if self.odd and value % 2 == 0:
            return "is even"
        return None


@dataclass(frozen=True)
class Real:
    """A finite int or float in a range; `open_min` excludes the lower end (beta > 0)."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    @property
    def allowed(self) -> str:
        if self.min is None and self.max is None:
            return "a finite number"
        lo = "(" if self.open_min or self.min is None else "["
        hi = ")" if self.open_max or self.max is None else "]"
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "inf" if self.max is None else f"{self.max:g}"
        return f"a finite number in {lo}{low}, {high}{hi}"

    def problem(self, value) -> str | None:
        if not _is_real(value):
            return _wrong_type(value)
        if not math.isfinite(value):
            return "is not finite"
        if self.min is not None and (value < self.min or (self.open_min and value == self.min)):
            return "is out of range"
        if self.max is not None and (value > self.max or (self.open_max and value == self.max)):
            return "is out of range"
        return None


@dataclass(frozen=True)
class Bool:
    allowed: str = "true or false"

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else _wrong_type(value)


@dataclass(frozen=True)
class Choice:
    """One of a tuple the code branches on."""

    choices: tuple

    @property
    def allowed(self) -> str:
        return f"one of {tuple(self.choices)!r}"

    def problem(self, value) -> str | None:
        try:
            return None if value in self.choices else "is not a known value"
        except TypeError:  # an unhashable value (a list) against dict keys
            return _wrong_type(value)


@dataclass(frozen=True)
class ListOf:
    """A non-empty list (or tuple) whose every entry passes `item`; `length` fixes its size."""

    item: Any
    length: int | None = None
    min_length: int = 1

    @property
    def allowed(self) -> str:
        size = f"of {self.length}" if self.length is not None else "non-empty"
        return f"a {size} list, each entry {self.item.allowed}"

    def problem(self, value) -> str | None:
        if not isinstance(value, (list, tuple)):
            return _wrong_type(value)
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
            return f"has {len(value)} entries"
        for i, entry in enumerate(value):
            bad = self.item.problem(entry)
            if bad:
                return f"has entry [{i}] = {entry!r}, which {bad}"
        return None


@dataclass(frozen=True)
class AnyOf:
    """The first rule that accepts the value wins: `AnyOf(Int(min=1), ListOf(Int(min=1)))`."""

    rules: tuple

    @property
    def allowed(self) -> str:
        return " or ".join(r.allowed for r in self.rules)

    def problem(self, value) -> str | None:
        problems = [r.problem(value) for r in self.rules]
        if None in problems:
            return None
        # The rule of the value's own type says more ("is out of range") than the others ("is an int").
        return next((p for p in problems if not p.startswith(WRONG_TYPE)), problems[-1])


@dataclass(frozen=True)
class Nullable:
    rule: Any

    @property
    def allowed(self) -> str:
        return f"null (None) or {self.rule.allowed}"

    def problem(self, value) -> str | None:
        return None if value is None else self.rule.problem(value)


@dataclass(frozen=True)
class Str:
    allowed: str = "a string"

    def problem(self, value) -> str | None:
        return None if isinstance(value, str) else _wrong_type(value)


STRING = Str()
POSITIVE = Int(min=1)
NON_NEGATIVE = Int(min=0)
PER_BLOCK_POSITIVE = AnyOf((POSITIVE, ListOf(POSITIVE)))
# Layer counts: SDXL's 10 transformer layers are the most any checkpoint has; 2**20 would build for
# minutes and then exhaust memory, in diffusers as in pare.
LAYERS = Int(1, 100)
PER_BLOCK_LAYERS = AnyOf((LAYERS, ListOf(LAYERS)))


# --- config tables ---------------------------------------------------------------------------


def _unet_rules() -> dict:
    from .models.activations import ACTIVATIONS
    from .models.resnet import TIME_EMBEDDING_NORMS

    activation = Choice(tuple(ACTIVATIONS))
    return {
        "sample_size": Nullable(AnyOf((POSITIVE, ListOf(POSITIVE, length=2)))),
        "in_channels": POSITIVE,
        "out_channels": POSITIVE,
        "center_input_sample": Bool(),
        "flip_sin_to_cos": Bool(),
        "freq_shift": Real(0, 1),  # divides as (half - freq_shift): 0 in SD, 1 in DDPM's UNets
        # Which block types pare has is checked by get_down_block & co., whose messages list them.
        "down_block_types": ListOf(STRING),
        "mid_block_type": Nullable(STRING),
        "up_block_types": ListOf(STRING),
        "only_cross_attention": AnyOf((Bool(), ListOf(Bool()))),
        "block_out_channels": ListOf(POSITIVE),
        "layers_per_block": PER_BLOCK_LAYERS,
        "downsample_padding": Int(0, 1),  # 0 pads (0, 1, 0, 1) by hand; 2 or more would miss the skips' sizes
        # The mid block divides by it: checkpoints use 1 (or sqrt 2); near 0 the output overflows.
        "mid_block_scale_factor": Real(1e-2, 1e2),
        "dropout": Real(0, 1, open_max=True),
        "act_fn": activation,
        "norm_num_groups": Nullable(POSITIVE),  # None: the UNet's own check explains why not
        "norm_eps": Real(0, open_min=True),
        "cross_attention_dim": PER_BLOCK_POSITIVE,
        "transformer_layers_per_block": AnyOf((LAYERS, ListOf(AnyOf((LAYERS, ListOf(LAYERS)))))),
        "reverse_transformer_layers_per_block": Nullable(ListOf(AnyOf((LAYERS, ListOf(LAYERS))))),
        "attention_head_dim": PER_BLOCK_POSITIVE,
        "use_linear_projection": Bool(),
        "addition_time_embed_dim": Nullable(POSITIVE),
        "upcast_attention": Nullable(Bool()),
        "resnet_time_scale_shift": Choice(TIME_EMBEDDING_NORMS),
        "time_embedding_dim": Nullable(POSITIVE),
        "time_embedding_act_fn": Nullable(activation),
        "timestep_post_act": Nullable(activation),
        "time_cond_proj_dim": Nullable(POSITIVE),
        "conv_in_kernel": Int(min=1, odd=True),  # padding (k - 1) // 2 keeps the size only for odd k
        "conv_out_kernel": Int(min=1, odd=True),
        "projection_class_embeddings_input_dim": Nullable(POSITIVE),
        "resnet_skip_time_act": Bool(),
        "resnet_out_scale_factor": Real(1e-2, 1e2),
        "mid_block_only_cross_attention": Nullable(Bool()),
        "addition_embed_type_num_heads": POSITIVE,
        # Their values are left to the UNet's own checks, which say what is not ported (CLASS_EMBED_TYPES, ...).
        "class_embed_type": Nullable(STRING),  # the x4 upscaler: None with num_class_embeds
        "num_class_embeds": Nullable(POSITIVE),
        "encoder_hid_dim": Nullable(POSITIVE),  # Kolors: text_proj from its ChatGLM width
        "encoder_hid_dim_type": Nullable(STRING),
    }


def _vae_rules() -> dict:
    from .models.activations import ACTIVATIONS
    from .models.vae import DOWN_BLOCKS, UP_BLOCKS

    return {
        "in_channels": POSITIVE,
        "out_channels": POSITIVE,
        "down_block_types": ListOf(Choice(tuple(DOWN_BLOCKS))),
        "up_block_types": ListOf(Choice(tuple(UP_BLOCKS))),
        "block_out_channels": ListOf(POSITIVE),
        "layers_per_block": LAYERS,
        "act_fn": Choice(tuple(ACTIVATIONS)),
        "latent_channels": POSITIVE,
        "norm_num_groups": POSITIVE,
        "sample_size": AnyOf((POSITIVE, ListOf(POSITIVE, length=2))),
        "scaling_factor": Real(0, open_min=True),
        "shift_factor": Nullable(Real()),
        "latents_mean": Nullable(ListOf(Real())),
        "latents_std": Nullable(ListOf(Real(0, open_min=True))),
        "force_upcast": Bool(),
        "use_quant_conv": Bool(),
        "use_post_quant_conv": Bool(),
        "mid_block_add_attention": Bool(),
    }


def _scheduler_rules(extra: dict) -> dict:
    from .schedulers.schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS
    from .schedulers.scheduling_utils import PREDICTION_TYPES

    beta = Real(0, 1, open_min=True)
    # Below 1e-6, 1 - beta rounds to 1 in float32: alpha_bar_0 = 1, and the step's variance 0 / 0 is NaN.
    beta_bound = Real(1e-6, 1)
    return {
        "num_train_timesteps": POSITIVE,
        "beta_start": beta_bound,
        "beta_end": beta_bound,
        "beta_schedule": Choice(BETA_SCHEDULES),
        "trained_betas": Nullable(ListOf(beta)),
        "clip_sample": Bool(),
        "prediction_type": Choice(PREDICTION_TYPES),
        "thresholding": Bool(),
        "dynamic_thresholding_ratio": Real(0, 1),
        "clip_sample_range": Real(0, open_min=True),
        "sample_max_value": Real(0, open_min=True),
        "timestep_spacing": Choice(TIMESTEP_SPACINGS),
        "steps_offset": NON_NEGATIVE,
        "rescale_betas_zero_snr": Bool(),
        **extra,
    }


def _ddpm_rules() -> dict:
    from .schedulers.scheduling_ddpm import VARIANCE_TYPES

    return _scheduler_rules({"variance_type": Choice(VARIANCE_TYPES)})


# Class name -> a function building its table (lazily: the tables name tuples of modules that import this one).
CONFIG_RULES = {
    "UNet2DConditionModel": _unet_rules,
    "AutoencoderKL": _vae_rules,
    "DDIMScheduler": lambda: _scheduler_rules({"set_alpha_to_one": Bool()}),
    "DDPMScheduler": _ddpm_rules,
}


def check_config(cls, config: dict, source: str) -> None:
    """Refuse a config value of the wrong type or out of range: ValueError naming file, key, value, allowed.

    `config` holds the keys the file sets; keys it leaves out take `cls.__init__`'s defaults, which the
    checks between keys see too (a file without norm_num_groups gets 32 groups)."""
    import inspect

    class_name = cls.__name__
    table = CONFIG_RULES.get(class_name)
    if table is None:
        return
    rules = table()
    for key, value in config.items():
        rule = rules.get(key)
        bad = rule.problem(value) if rule is not None else None
        if bad:
            raise ValueError(f"{class_name}: {source} sets {key}={value!r}, which {bad}; {key} must be {rule.allowed}")
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    _check_cross_keys(class_name, {**defaults, **config}, source)


LEFT_OUT = " (a key the config leaves out has its default)"


def _check_cross_keys(class_name: str, config: dict, source: str) -> None:
    """Keys that must agree with each other: one entry per resolution, channels divisible by groups and heads."""
    if "block_out_channels" not in config:
        return
    channels = list(config["block_out_channels"])
    n = len(channels)
    # The UNet checks its per-block lists itself (_check_config, _per_block), naming the key.
    per_block = () if class_name == "UNet2DConditionModel" else ("down_block_types", "up_block_types")
    for key in per_block:
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{class_name}: in {source}, {key}={list(value)!r} has {len(value)} entries, but "
                             f"block_out_channels={channels!r} has {n}: give one entry per resolution{LEFT_OUT}")
    groups = config.get("norm_num_groups")
    if _is_int(groups):
        for i, c in enumerate(channels):
            if c % groups:
                raise ValueError(f"{class_name}: in {source}, block_out_channels[{i}]={c}, which GroupNorm cannot "
                                 f"split into norm_num_groups={groups} groups; each entry must be a multiple of "
                                 f"{groups}{LEFT_OUT}")
    heads = config.get("attention_head_dim")
    if class_name == "UNet2DConditionModel" and heads is not None:
        per_block = heads if isinstance(heads, (list, tuple)) else [heads] * n
        for i, (c, h) in enumerate(zip(channels, per_block)):
            if c % h:
                raise ValueError(f"{class_name}: in {source}, attention_head_dim={heads!r} (read as the number of "
                                 f"heads, as in diffusers) does not divide block_out_channels[{i}]={c}{LEFT_OUT}")


# --- model_index.json ------------------------------------------------------------------------


def check_model_index(index, path) -> None:
    """model_index.json: an object whose component entries are [library, class name] (or [null, null])."""
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(index).__name__}")
    for key, value in index.items():
        if key.startswith("_"):
            if key == "_class_name" and not isinstance(value, str):
                raise ValueError(f"{path}: _class_name={value!r} must be a string (the pipeline class)")
            continue
        if isinstance(value, list) and not (
                len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {key}={value!r} must be a component entry [library, class name], "
                             f'e.g. ["diffusers", "UNet2DConditionModel"], or [null, null]')
        if key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score", "requires_safety_checker") \
                and not isinstance(value, bool):
            raise ValueError(f"{path}: {key}={value!r} must be true or false")


# --- pipeline arguments ----------------------------------------------------------------------

SIZE = Nullable(POSITIVE)
PAIR = Nullable(ListOf(NON_NEGATIVE, length=2))
# Argument -> rule, for every numeric argument a pare pipeline takes. The ranges: eta is DDIM's
# interpolation between deterministic DDIM (0) and DDPM-like noise (1) (arXiv 2010.02502 eq. 16);
# above 1 diffusers' DDIM returns NaN. guidance_rescale is the weight phi of arXiv 2305.08891 eq. 16.
ARGUMENT_RULES = {
    "height": SIZE,
    "width": SIZE,
    "num_inference_steps": Nullable(POSITIVE),  # None with custom `timesteps`
    # Past |w| = 1000 the guided noise throws the latents out of any model's range: diffusers returns NaN images.
    "guidance_scale": Real(-1000, 1000),
    "guidance_rescale": Real(0, 1),  # diffusers skips phi <= 0 without a word, and runs into NaN for large phi
    "num_images_per_prompt": POSITIVE,
    "eta": Real(0, 1),
    "strength": Real(),  # its range (0, 1] is checked by Img2ImgMixin.prepare_image
    "clip_skip": Nullable(NON_NEGATIVE),
    "aesthetic_score": Real(),
    "negative_aesthetic_score": Real(),
    "original_size": PAIR,
    "target_size": PAIR,
    "negative_original_size": PAIR,
    "negative_target_size": PAIR,
    "crops_coords_top_left": Nullable(ListOf(Int(), length=2)),
    "negative_crops_coords_top_left": Nullable(ListOf(Int(), length=2)),
    "denoising_end": Nullable(Real(0, 1, open_min=True, open_max=True)),
    "denoising_start": Nullable(Real(0, 1, open_min=True, open_max=True)),
    "controlnet_conditioning_scale": AnyOf((Real(), ListOf(Real()))),
}

# Tensor arguments: name -> which width they must have (see `check_embeddings`).
EMBEDDING_ARGUMENTS = ("prompt_embeds", "negative_prompt_embeds")
POOLED_ARGUMENTS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def check_call_arguments(pipe, arguments: dict) -> None:
    """Check a pipeline call's arguments (its `locals()` at the top of `__call__`) before any model runs.

    Numbers: type, finiteness and range from `ARGUMENT_RULES`; `clip_skip` against the text encoder's
    depth; embeddings, latents and images against the models' configs.
    """
    owner = type(pipe).__name__
    for name, value in arguments.items():
        rule = ARGUMENT_RULES.get(name)
        if rule is None:
            continue
        if name == "eta" and not _step_takes_eta(pipe):
            rule = Real()  # a scheduler without eta ignores it, in diffusers too: only its type is checked
        bad = rule.problem(value)
        if bad:
            error = TypeError if bad.startswith(WRONG_TYPE) else ValueError
            raise error(f"{owner}: `{name}`={value!r} {bad}; it must be {rule.allowed}")
    clip_skip = arguments.get("clip_skip")
    if clip_skip is not None:
        deepest = _deepest_clip_skip(pipe)
        if deepest is not None and clip_skip > deepest:
            raise ValueError(f"{owner}: `clip_skip`={clip_skip} reaches below the text encoder's first layer; "
                             f"it counts layers back from the last, so it must be in [0, {deepest}]")
    check_embeddings(pipe, arguments)
    latents = arguments.get("latents")
    if latents is not None:
        _check_tensor(owner, "latents", latents)
    if arguments.get("image") is not None:
        check_image(owner, arguments["image"], getattr(pipe, "vae_scale_factor", 8))


def _step_takes_eta(pipe) -> bool:
    import inspect

    scheduler = getattr(pipe, "scheduler", None)
    return scheduler is not None and "eta" in inspect.signature(scheduler.step).parameters


def _deepest_clip_skip(pipe) -> int | None:
    """SD reads hidden_states[-(clip_skip + 1)] of L + 1 states, SDXL hidden_states[-(clip_skip + 2)]."""
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
    if not encoders:
        return None
    layers = min(e.config.num_hidden_layers for e in encoders)
    return layers - 1 if hasattr(pipe, "text_encoder_2") else layers


def _check_tensor(owner: str, name: str, value) -> None:
    import torch

    if not torch.is_tensor(value):
        raise TypeError(f"{owner}: `{name}` must be a torch.Tensor, not {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{owner}: `{name}` must be a floating-point tensor, not {value.dtype}")
    if not _tracing(value) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{owner}: `{name}` holds NaN or inf values; every value must be finite")


def check_embeddings(pipe, arguments: dict) -> None:
    """prompt_embeds: (B, T, D) with D the UNet's cross_attention_dim; pooled: (B, pooled width)."""
    owner = type(pipe).__name__
    unet = pipe.unet.config
    dims = unet.cross_attention_dim
    dims = set(dims) if isinstance(dims, (list, tuple)) else {dims}
    for name in EMBEDDING_ARGUMENTS:
        value = arguments.get(name)
        if value is None:
            continue
        _check_tensor(owner, name, value)
        if value.ndim != 3 or value.shape[-1] not in dims:
            raise ValueError(f"{owner}: `{name}` has shape {tuple(value.shape)}; it must be (batch, tokens, "
                             f"{'|'.join(map(str, sorted(dims)))}), the UNet's cross_attention_dim")
    if unet.addition_embed_type == "text_time":
        width = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        for name in POOLED_ARGUMENTS:
            value = arguments.get(name)
            if value is None:
                continue
            _check_tensor(owner, name, value)
            if value.ndim != 2 or value.shape[-1] != width:
                raise ValueError(f"{owner}: `{name}` has shape {tuple(value.shape)}; it must be (batch, {width}): "
                                 f"projection_class_embeddings_input_dim minus 6 x addition_time_embed_dim")
    batches = {name: arguments[name].shape[0] for name in (*EMBEDDING_ARGUMENTS, *POOLED_ARGUMENTS)
               if arguments.get(name) is not None}
    if len(set(batches.values())) > 1:
        raise ValueError(f"{owner}: the embeddings have different batch sizes {batches}; they must agree")


# PIL modes that convert to RGB without losing their meaning: 8 bits per channel.
IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


def check_image(owner: str, image, min_side: int) -> None:
    """An img2img image: a PIL image of an 8-bit mode, or a float array/tensor, at least min_side pixels a side."""
    import numpy as np
    import PIL.Image
    import torch

    images = image if isinstance(image, list) else [image]
    for i, one in enumerate(images):
        name = f"image[{i}]" if isinstance(image, list) else "image"
        if isinstance(one, PIL.Image.Image):
            if one.mode not in IMAGE_MODES:
                raise ValueError(f"{owner}: `{name}` is a PIL image of mode {one.mode!r}, which pare does not convert "
                                 f"to RGB (16-bit and float modes would be clipped); convert it to 8-bit RGB first "
                                 f"(modes taken: {IMAGE_MODES})")
            sides = (one.height, one.width)
        elif isinstance(one, (np.ndarray, torch.Tensor)):
            is_float = one.dtype.kind == "f" if isinstance(one, np.ndarray) else one.is_floating_point()
            if not is_float:
                raise TypeError(f"{owner}: `{name}` is an array of {one.dtype}; arrays and tensors must be float "
                                f"in [0, 1] (PIL images may be 8-bit)")
            finite = np.isfinite(one).all() if isinstance(one, np.ndarray) else (_tracing(one) or torch.isfinite(one).all())
            if not bool(finite):
                raise ValueError(f"{owner}: `{name}` holds NaN or inf values")
            if one.ndim not in (3, 4):
                raise ValueError(f"{owner}: `{name}` has shape {tuple(one.shape)}; arrays are (H, W, C) or "
                                 f"(B, H, W, C), tensors (C, H, W) or (B, C, H, W)")
            sides = tuple(one.shape[-3:-1]) if isinstance(one, np.ndarray) else tuple(one.shape[-2:])
        else:
            continue  # preprocess_image names the wrong type
        if min(sides) < min_side:
            raise ValueError(f"{owner}: `{name}` is {sides[0]} x {sides[1]} pixels; the VAE needs at least "
                             f"{min_side} x {min_side} (sides are cut down to a multiple of {min_side})")


# --- model inputs ----------------------------------------------------------------------------


def check_finite_inputs(owner: str, **tensors) -> None:
    """Refuse NaN or inf in a model's conditioning: the result would be NaN everywhere, far from the cause.

    One host read for all of them together; skipped while a CUDA graph is captured or torch.compile traces.
    """
    import torch

    present = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    numbers_ = {k: v for k, v in tensors.items() if isinstance(v, float)}
    for name, value in numbers_.items():
        if not math.isfinite(value):
            raise ValueError(f"{owner}: `{name}`={value!r} is not finite")
    if not present or any(_tracing(v) for v in present.values()):
        return
    by_device: dict = {}  # one host read per device: a CPU timestep beside CUDA conditioning is common
    for name, v in present.items():
        by_device.setdefault(v.device, []).append(name)
    if not all(bool(torch.stack([torch.isfinite(present[n]).all() for n in names]).all()) for names in by_device.values()):
        bad = [name for name, v in present.items() if not bool(torch.isfinite(v).all())]
        raise ValueError(f"{owner}: {', '.join(f'`{b}`' for b in bad)} holds NaN or inf values; "
                         f"every timestep and conditioning value must be finite")


def _tracing(x) -> bool:
    """True while a CUDA graph is being captured or torch.compile traces: no host reads of tensor values then."""
    import torch

    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
