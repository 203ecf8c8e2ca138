"""What every pipeline shares: loading a model folder, seeded noise, images in and out.

diffusers twins: `pipelines/pipeline_utils.py` (`DiffusionPipeline.from_pretrained`, `.to`,
`progress_bar`), `utils/torch_utils.py` (`randn_tensor`), `image_processor.py`
(`VaeImageProcessor.preprocess` / `postprocess`) and the helpers at the top of
`pipelines/stable_diffusion/pipeline_stable_diffusion.py` (`rescale_noise_cfg`,
`retrieve_timesteps`).

A pipeline folder is laid out as diffusers saves it:

    model_index.json        {"unet": ["diffusers", "UNet2DConditionModel"], ...} plus pipeline options
    unet/ vae/              pare models (config.json + safetensors)
    scheduler/              scheduler_config.json, its class resolved through pare's registry
    text_encoder/ tokenizer/ [text_encoder_2/ tokenizer_2/]   transformers CLIP
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..loading import resolve_folder
from ..lora.mixin import LoraLoaderMixin

logger = logging.getLogger("pare")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """`images`: a list of PIL images, an (N, H, W, 3) float array in [0, 1], an (N, 3, H, W) tensor, or latents."""

    images: Any


# --- noise ---------------------------------------------------------------------------------


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' `randn_tensor` draws it, so one seed means one image in both.

    - A CPU generator draws on the CPU and the result moves to `device`: CPU and GPU runs
      then start from the same noise.
    - A list of generators draws one sample per generator, each of shape (1, ...), and
      stacks them; a list of one generator is the same as that generator alone.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, list) else generator).device
        if gen_device.type == "cpu" and device.type != "cpu":
            rand_device = torch.device("cpu")
        elif gen_device.type != device.type:
            raise ValueError(f"a generator on {gen_device.type} cannot draw noise for a tensor on {device.type}; "
                             f"create it with torch.Generator({device.type!r}) or on the CPU")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        one = (1, *shape[1:])
        samples = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(samples, dim=0).to(device)  # (B, ...)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


# --- guidance and timesteps ----------------------------------------------------------------


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale: Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", arXiv 2305.08891, section 3.4.

    Classifier-free guidance inflates the prediction's standard deviation; rescale it back to the
    text-conditioned prediction's std, then blend with the unrescaled guidance by `guidance_rescale`
    (the paper's phi) so the image does not wash out.
    """
    dims = list(range(1, noise_pred_text.ndim))  # per sample: std over (C, H, W)
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)  # eq. 15-16
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def step_callback(pipe, callback, i: int, t, latents: torch.Tensor, prompt_embeds: torch.Tensor, callback_inputs):
    """diffusers' `callback_on_step_end` after step i: the callback sees the tensors it asked for and may replace
    them (a dict of new ones, or None); returns (latents, prompt_embeds)."""
    if callback is None:
        return latents, prompt_embeds
    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
    replaced = callback(pipe, i, t, {k: tensors[k] for k in callback_inputs}) or {}
    return replaced.get("latents", latents), replaced.get("prompt_embeds", prompt_embeds)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """An LCM-distilled UNet's guidance condition: sinusoidal features of 1000 w, (B,) -> (B, embedding_dim), float32.

    Latent consistency models distil CFG into the UNet, which takes the guidance weight as an input
    (Luo et al., arXiv 2310.04378, section 4.2), embedded as VDM embeds timesteps. diffusers twin:
    `StableDiffusionPipeline.get_guidance_scale_embedding`.
    """
    w = w.to(torch.float32) * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)  # a float32 tensor, as in diffusers, for the same rounding
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # (half,)
    angles = w[:, None] * frequencies[None, :]  # (B, 1) * (1, half) -> (B, half)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, 2 * half)
    if embedding_dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))  # (B, embedding_dim)
    return embedding


def accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def retrieve_timesteps(scheduler, num_inference_steps: int, device, timesteps: list[int] | None = None,
                       sigmas: list[float] | None = None):
    """`scheduler.set_timesteps` from a step count, or a custom list of `timesteps` or of `sigmas`.

    Returns (scheduler.timesteps, the step count). With a custom list the count is
    len(scheduler.timesteps), which for a second-order scheduler (Heun) counts each repeated
    timestep: diffusers' `retrieve_timesteps` does the same, and img2img's `strength` applies to it.
    `check_timestep_inputs` has refused a list the scheduler does not take.
    """
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    elif sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps, num_inference_steps
    return scheduler.timesteps, len(scheduler.timesteps)


def check_timestep_inputs(scheduler, num_inference_steps, timesteps, sigmas) -> None:
    """Refuse a step count below 1, both custom lists at once, or a list the scheduler's set_timesteps does not take."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass at most one of `timesteps` and `sigmas`: each sets the whole schedule")
    if timesteps is None and sigmas is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}")
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None and not accepts(scheduler.set_timesteps, name):
            takers = custom_schedule_takers(name)
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no custom `{name}`; use "
                             f"num_inference_steps, or a scheduler that takes them ({', '.join(takers)})")


def custom_schedule_takers(argument: str) -> list[str]:
    """The registered schedulers whose set_timesteps takes `argument` ("timesteps" or "sigmas")."""
    from ..schedulers import SCHEDULERS

    return [name for name, cls in SCHEDULERS.items() if accepts(cls.set_timesteps, argument)]


def extra_step_kwargs(scheduler, generator, eta: float) -> dict:
    """`eta` (DDIM's eta, arXiv 2010.02502 eq. 16) and `generator` only for schedulers whose `step` takes them."""
    kwargs = {}
    if accepts(scheduler.step, "eta"):
        kwargs["eta"] = eta
    if accepts(scheduler.step, "generator"):
        kwargs["generator"] = generator
    return kwargs


# --- images in and out ---------------------------------------------------------------------


def preprocess_image(image, vae_scale_factor: int, latent_channels: int = 4) -> torch.Tensor:
    """PIL / numpy / torch image(s) -> (B, 3, H, W) tensor in [-1, 1], as `VaeImageProcessor.preprocess` does.

    Sides are cut down to a multiple of `vae_scale_factor`: PIL with Lanczos, arrays and tensors
    with nearest interpolation. Arrays are (H, W, C) or (B, H, W, C) and tensors (C, H, W) or
    (B, C, H, W), both in [0, 1]. A tensor with `latent_channels` channels is taken to be latents
    already and passes through untouched.
    """
    import PIL.Image

    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in images):
        raise ValueError(f"`image` must be a PIL image, a numpy array or a torch tensor (or a non-empty list of "
                         f"them), not {type(image).__name__}")

    def multiple(height, width):
        return height - height % vae_scale_factor, width - width % vae_scale_factor

    if isinstance(images[0], PIL.Image.Image):
        # diffusers would read an RGBA image as 4 channels and take it for latents; pare makes it RGB.
        images = [i if i.mode == "RGB" else i.convert("RGB") for i in images]
        height, width = multiple(images[0].height, images[0].width)
        images = [i.resize((width, height), resample=PIL.Image.LANCZOS) for i in images]
        array = np.stack([np.array(i).astype(np.float32) / 255.0 for i in images])  # (B, H, W, 3)
        pixels = torch.from_numpy(array.transpose(0, 3, 1, 2))  # (B, H, W, 3) -> (B, 3, H, W)
    else:
        if isinstance(images[0], np.ndarray):
            array = np.concatenate(images) if images[0].ndim == 4 else np.stack(images)  # (B, H, W, C)
            if array.ndim == 3:
                array = array[..., None]
            pixels = torch.from_numpy(array.transpose(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        else:
            pixels = torch.cat(images) if images[0].ndim == 4 else torch.stack(images)  # (B, C, H, W)
            if pixels.shape[1] == latent_channels:
                return pixels
        pixels = torch.nn.functional.interpolate(pixels, size=multiple(*pixels.shape[-2:]))

    if pixels.min() < 0:
        # diffusers' behaviour, kept so that the same call gives the same image: such input is taken as [-1, 1].
        warnings.warn("`image` has values below 0, so it is taken to be in [-1, 1] already; pass images in [0, 1]",
                      FutureWarning, stacklevel=3)
        return pixels
    return 2.0 * pixels - 1.0  # [0, 1] -> [-1, 1]


def postprocess_image(image: torch.Tensor, output_type: str):
    """(B, 3, H, W) decoder output in [-1, 1] -> `output_type`, as `VaeImageProcessor.postprocess` does."""
    if output_type == "latent":
        return image
    image = (image * 0.5 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
    if output_type == "np":
        return array
    import PIL.Image

    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


# --- loading and moving --------------------------------------------------------------------


def read_model_index(root: Path) -> dict:
    path = root / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a pipeline folder: it has no model_index.json")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    from ..validation import check_model_index

    check_model_index(index, path)
    return index


def pipeline_root(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder as is; for a Hub repo id, the snapshot folder its model_index.json is fetched into.

    Components are fetched one subfolder at a time as they load, so a failed check fetches no weights.
    """
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor a Hub repo id of the form 'org/name'")
    from huggingface_hub import hf_hub_download

    hub_kwargs["local_files_only"] = bool(hub_kwargs.get("local_files_only"))
    return Path(hf_hub_download(repo_id, "model_index.json", **hub_kwargs)).parent


# The classes model_index.json may name for each kind of component (the scheduler: pare's registry).
KNOWN_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "controlnet": ("ControlNetModel",),
}


class PipelineMixin(LoraLoaderMixin):
    """`from_pretrained`, `.to`, `device`, `dtype` and the progress bar, for the pipelines of this package.

    A subclass maps each component name to its kind (a key of `KNOWN_CLASSES`, or "scheduler")
    in `component_kinds`, and names in `options` the `__init__` arguments it reads from
    model_index.json (`force_zeros_for_empty_prompt`, ...). As in diffusers, `pipe.components`
    is the dict of component objects, so `OtherPipeline(**pipe.components)` shares them.
    LoRA methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...) come from pare/lora/mixin.py.
    """

    component_kinds: dict[str, str] = {}
    options: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, **kwargs):
        """Load a diffusers-format pipeline folder or Hub repo; components passed by name are used as given.

        Every component is checked (listed in model_index.json, its folder present, its class known
        to pare) before any weights are read, so a bad folder fails at once and loads nothing.
        `torch_dtype` and `variant` ("fp16") apply to every model, as in diffusers; the models come
        back in float32 unless `torch_dtype` says otherwise. Hub options: revision, cache_dir,
        local_files_only, token.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        unknown = sorted(set(kwargs) - set(cls.component_kinds) - set(cls.options))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {unknown}; "
                            f"components: {list(cls.component_kinds)}, options: {list(cls.options)}")
        root = pipeline_root(path_or_repo_id, **hub_kwargs)
        index = read_model_index(root)
        local = Path(path_or_repo_id).is_dir()

        to_load, problems = {}, []
        for name, kind in cls.component_kinds.items():
            if name in kwargs:
                continue
            entry = index.get(name)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
                problems.append(f"{name}: missing from model_index.json (entry: {entry!r})")
                continue
            class_name = entry[1]
            problem = _class_problem(kind, class_name)
            if problem is None and local and not (root / name).is_dir():
                problem = f"model_index.json lists {class_name}, but the folder {root / name} does not exist"
            if problem:
                problems.append(f"{name}: {problem}")
            to_load[name] = (kind, class_name)
        if problems:
            raise ValueError(f"cannot load {cls.__name__} from {path_or_repo_id}:\n  " + "\n  ".join(problems))

        loaded = {}
        for name, (kind, class_name) in to_load.items():
            folder = resolve_folder(root if local else path_or_repo_id, name, **hub_kwargs)
            loaded[name] = _load_component(kind, class_name, folder, torch_dtype, variant)
        options = {k: index[k] for k in cls.options if k in index}
        return cls(**{**loaded, **options, **kwargs})

    @classmethod
    def from_single_file(cls, path_or_state_dict, **kwargs):
        """Load every model from one original-layout checkpoint; tokenizers and scheduler from `config=`.

        Arguments: `config` (a diffusers folder or Hub id; default: the family's diffusers repo),
        `prediction_type`, `torch_dtype`, `allow_pickle`, `extract_ema`, components by name. See pare/single_file/.
        """
        from ..single_file import pipeline_from_single_file

        return pipeline_from_single_file(cls, path_or_state_dict, **kwargs)

    @property
    def components(self) -> dict:
        return {name: getattr(self, name) for name in self.component_kinds}

    def models(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    def to(self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None):
        """Move every model to `device` and/or cast it to `dtype`: `.to("cuda")`, `.to(torch.float16)`, both."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for model in self.models():
            model.to(device=device, dtype=dtype)
        return self

    def enable_fast(self, **options):
        """The fast path (pare/fast/): fused kernels, channels last and, on CUDA, the UNet from CUDA graphs."""
        from ..fast import optimize

        return optimize(self, **options)

    def disable_fast(self):
        """Back to the reference modules (the weights stay where they are)."""
        from ..fast import restore

        return restore(self)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the denoising loop, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **getattr(self, "_progress_bar_config", {}))


def _class_problem(kind: str, class_name: str) -> str | None:
    if kind == "scheduler":
        from ..schedulers import SCHEDULERS

        if class_name not in SCHEDULERS:
            return (f"model_index.json names {class_name}, which pare does not implement (pare has "
                    f"{', '.join(sorted(SCHEDULERS))}). Pass one of those explicitly, built from the folder's "
                    f"scheduler config: from_pretrained(path, scheduler="
                    f"pare.EulerDiscreteScheduler.from_config(f\"{{path}}/scheduler\"))")
    elif class_name not in KNOWN_CLASSES[kind]:
        return f"model_index.json names {class_name}; pare loads {' or '.join(KNOWN_CLASSES[kind])} here"
    return None


def _load_component(kind: str, class_name: str, folder: Path, torch_dtype, variant):
    if kind == "unet":
        from ..models.unet_2d_condition import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if kind == "controlnet":
        from ..models.controlnet import ControlNetModel

        return ControlNetModel.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if kind == "vae":
        from ..models.autoencoder_kl import AutoencoderKL

        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if kind == "scheduler":
        from ..schedulers import get_scheduler_class

        return get_scheduler_class(class_name).from_config(folder)
    import transformers

    cls = getattr(transformers, class_name)
    if kind == "tokenizer":
        return cls.from_pretrained(folder)
    extra = {"variant": variant} if variant is not None else {}
    return cls.from_pretrained(folder, dtype=torch_dtype or torch.float32, **extra).eval()
