"""What every discrete-time (DDPM-family) scheduler shares: config checks, the forward process, x_0 prediction.

diffusers twin: `schedulers/scheduling_utils.py` (`SchedulerMixin`), `utils/torch_utils.py`
(`randn_tensor`), and the methods diffusers copies into each scheduler (`add_noise`,
`get_velocity`, `_threshold_sample`, the prediction-type branches of `step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from ..configuration import Config, ConfigMixin
from .schedule import TIMESTEP_SPACINGS, make_betas, rescale_zero_terminal_snr

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

Generator = torch.Generator | Sequence[torch.Generator] | None


class SchedulerOutput(NamedTuple):
    """What `step` returns. diffusers twin: `DDIMSchedulerOutput` / `DDPMSchedulerOutput` (and `SchedulerOutput`).

    Multistep solvers (PNDM, UniPC, DEIS) return only prev_sample, as diffusers' plain `SchedulerOutput` does:
    pred_original_sample is then None, and `return_dict=False` gives the 1-tuple `(prev_sample,)`.
    """

    prev_sample: torch.Tensor  # x_{t-1}: the next input of the denoising loop
    pred_original_sample: torch.Tensor | None = None  # x_0 as predicted at this step (after clipping / thresholding)


def check_choice(owner: str, key: str, value, choices: tuple) -> None:
    """Raise a ValueError naming the config key, its bad value and the values the code implements."""
    if value not in choices:
        raise ValueError(f"{owner}: {key}={value!r} is not supported; expected one of {choices}")


def pred_original_and_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from what the model predicts, using x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    - epsilon:      the model predicts eps; x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
                    (Ho et al., arXiv 2006.11239, eq. 15; DDIM, arXiv 2010.02502, eq. 9 and the first term of eq. 12)
    - sample:       the model predicts x_0; eps follows from the same identity
    - v_prediction: the model predicts v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
                    (Salimans & Ho, arXiv 2202.00512, section 4; Imagen Video, arXiv 2210.02303, section 2.4)

    epsilon at alpha_bar_t == 0 (the last timestep after rescale_betas_zero_snr) divides by zero:
    diffusers returns inf/NaN (or, with clip_sample, a clamped +-1 that carries no information);
    pare raises, pointing to v_prediction as Lin et al., arXiv 2305.08891, section 3.2 do.
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        if alpha_prod_t == 0:
            raise ValueError(
                "prediction_type='epsilon' cannot recover x_0 at a timestep with zero SNR (alpha_prod_t == 0, "
                "the last timestep when rescale_betas_zero_snr=True): use prediction_type='v_prediction' "
                "(Lin et al., arXiv 2305.08891, section 3.2), or a spacing that skips that timestep"
            )
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is unknown; expected one of {PREDICTION_TYPES}")
    return pred_original_sample, pred_epsilon


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of a predicted x_0 (Saharia et al., Imagen, arXiv 2205.11487, section 2.3).

    Per sample: s = the `ratio` quantile of |x_0|, clamped to [1, max_value]; then x_0 -> clamp(x_0, -s, s) / s.
    With s clamped at 1 this is plain clipping to [-1, 1]. Meant for pixel-space models;
    unsuitable for latent diffusion such as Stable Diffusion. diffusers twin: `_threshold_sample`.
    """
    dtype = sample.dtype
    batch_size, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # torch.quantile needs float32 or float64
    flat = sample.reshape(batch_size, -1)  # (B, C, H, W) -> (B, C*H*W)
    s = torch.quantile(flat.abs(), ratio, dim=1)  # (B,): "a certain percentile absolute pixel value"
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)  # (B, 1)
    flat = torch.clamp(flat, -s, s) / s  # "threshold x_0 to the range [-s, s] and then divide by s"
    return flat.reshape(batch_size, channels, *rest).to(dtype)


def clip_or_threshold(pred_original_sample: torch.Tensor, config) -> torch.Tensor:
    """Dynamic thresholding if `config.thresholding`, else clamp to +-clip_sample_range if `config.clip_sample`."""
    if config.thresholding:
        return threshold_sample(pred_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)
    return pred_original_sample


def randn_tensor(shape, generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise that matches diffusers' `randn_tensor` draw for draw.

    A CPU generator draws on the CPU (then the noise moves to `device`), so a seed gives the same
    noise on every device. A list of generators draws one batch element each.
    """
    device = torch.device(device)
    draw_device = device
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generators[0] is not None:
        generator_device = generators[0].device.type
        if generator_device == "cpu":
            draw_device = torch.device("cpu")
        elif generator_device != device.type:
            raise ValueError(f"cannot draw noise for a {device.type} tensor from a {generator_device} generator")
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0], device=draw_device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: give one per batch element")
    per_item = (1, *shape[1:])
    return torch.cat([torch.randn(per_item, generator=g, device=draw_device, dtype=dtype) for g in generators]).to(device)


def schedule_value(scheduler, timestep):
    """The value of `timestep` when it is an element of `scheduler.timesteps`, as a pipeline's loop passes it, read
    from a host copy of the schedule (`host_schedule`); None for anything else.

    Reading a CUDA tensor's value makes the CPU wait until the GPU has run everything queued: once a
    step, that keeps the CPU from queueing the next step while the GPU runs this one, and a CUDA graph
    of the whole loop (pare/fast/loop.py) cannot hold it at all.
    """
    ts = scheduler.timesteps
    if not (torch.is_tensor(timestep) and timestep.ndim == 0 and timestep._base is ts and ts.ndim == 1
            and not ts.is_inference()):  # an inference tensor keeps no version counter
        return None
    return host_schedule(scheduler)[(timestep.storage_offset() - ts.storage_offset()) // ts.stride(0)]


def host_schedule(scheduler) -> list:
    """`scheduler.timesteps` as a list, read to the host once (again if it is replaced or changed in place); from the
    copy `to_device` kept, where it made them, with no read of the GPU at all."""
    ts = scheduler.timesteps
    host = getattr(scheduler, "_host_timesteps", None)
    if host is None or host[0] is not ts or host[1] != ts._version:
        kept = host_values(ts)
        host = scheduler._host_timesteps = (ts, ts._version, (ts if kept is None else kept).tolist())
    return host[2]


def to_device(values: torch.Tensor, device: str | torch.device | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values.to(device, dtype)` for a schedule made on the host, which `set_timesteps` moves to the pipeline's device.

    On a GPU the host copy is kept beside the result (`host_values` reads it), so reading the schedule back, as the
    fast loop's key (`pare/fast/loop.py`) and `host_schedule` do, waits for nothing; and the copy goes from pinned
    memory without blocking, where a plain `.to("cuda")` from pageable memory makes the CPU wait until the GPU has run
    everything queued (the text encoder's work, in a pipeline call). The values are the same either way: the cast is
    on the host, and IEEE rounding gives the bits a cast on the device would.
    """
    values = values if dtype is None else values.to(dtype)
    device = values.device if device is None else torch.device(device)
    if device.type != "cuda" or values.device.type != "cpu":
        return values.to(device)
    pinned = values.contiguous().pin_memory()  # a copy: later changes to `values` (or its numpy array) do not reach it
    out = pinned.to(device, non_blocking=True)
    if not out.is_inference():  # an inference tensor has no version counter to tell whether it was changed since
        out._pare_host = (out._version, pinned)
    return out


def host_values(t: torch.Tensor) -> torch.Tensor | None:
    """The host copy of a tensor that `to_device` made, or of a view of one (a slice of the timesteps, as img2img
    walks), while neither has been changed in place since; None otherwise (then read the tensor itself)."""
    base = t if t._base is None else t._base
    kept = getattr(base, "_pare_host", None)
    if kept is None or base.is_inference() or kept[0] != base._version or t.dtype != base.dtype:
        return None
    if base is t:
        return kept[1]
    return kept[1].as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def coefficients_on(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A few coefficients solved on the host (a (K,) CPU tensor), in like's dtype and on like's device, made there by
    fills of their values rather than copied from the host: a CUDA graph of the loop (pare/fast/loop.py) can hold a
    fill, whose value is a kernel argument, but not a copy from pageable host memory. The cast is on the host,
    float32 -> like's dtype, rounded as on the device."""
    values = values.to(like.dtype)
    if like.device.type == "cpu":
        return values
    return torch.stack([torch.full((), v, dtype=like.dtype, device=like.device) for v in values.tolist()])


class DiscreteScheduler(ConfigMixin):
    """Base of pare's DDPM-family schedulers: a beta schedule over `num_train_timesteps` integer timesteps.

    diffusers twin: `SchedulerMixin` plus the shared parts of `DDIMScheduler` / `DDPMScheduler`.
    Subclasses set `beta_schedules` (the ones they accept) and call `_build_schedule` from `__init__`.
    """

    config_name = "scheduler_config.json"
    order = 1  # model evaluations per step; pipelines read it
    init_noise_sigma = 1.0  # x_T ~ N(0, I): the initial latents need no scaling
    beta_schedules: tuple[str, ...] = ()

    def _build_schedule(self) -> None:
        """Check the config's shared keys, then compute betas, alphas and alphas_cumprod (float32, CPU).

        Keys a class does not have (PNDM has no `thresholding`, DEIS no `rescale_betas_zero_snr`) count as off.
        """
        c, owner = self.config, type(self).__name__
        check_choice(owner, "beta_schedule", c.beta_schedule, self.beta_schedules)
        check_choice(owner, "prediction_type", c.prediction_type, PREDICTION_TYPES)
        check_choice(owner, "timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
        if not isinstance(c.num_train_timesteps, int) or c.num_train_timesteps < 1:
            raise ValueError(f"{owner}: num_train_timesteps must be a positive int, got {c.num_train_timesteps!r}")
        if not isinstance(c.steps_offset, int) or c.steps_offset < 0:
            raise ValueError(f"{owner}: steps_offset must be a non-negative int, got {c.steps_offset!r}")
        if c.get("thresholding") and not 0 <= c.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"{owner}: dynamic_thresholding_ratio must lie in [0, 1], got {c.dynamic_thresholding_ratio!r}")
        if c.trained_betas is not None and len(c.trained_betas) != c.num_train_timesteps:
            # diffusers would build a schedule of len(trained_betas) but space timesteps over num_train_timesteps.
            raise ValueError(
                f"{owner}: trained_betas has {len(c.trained_betas)} values but num_train_timesteps={c.num_train_timesteps}"
            )

        if c.trained_betas is not None and not isinstance(c.trained_betas, list):
            # A numpy array or tensor becomes a list of floats, so that save_config writes valid JSON
            # (diffusers keeps the array and converts it when saving).
            object.__setattr__(self, "_pare_config", Config({**c, "trained_betas": [float(b) for b in c.trained_betas]}))
            c = self.config

        self.betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        if c.get("rescale_betas_zero_snr"):
            self.betas = rescale_zero_terminal_snr(self.betas)
        if not bool(((self.betas >= 0) & (self.betas <= 1)).all()):
            raise ValueError(f"{owner}: every beta must lie in [0, 1]; this config gives {self.betas.min():.3g} .. {self.betas.max():.3g}")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t; stays float32 on the CPU
        self.num_inference_steps = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)  # T-1, ..., 0

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **overrides):
        """Build from a pipeline folder (`subfolder="scheduler"`) or a scheduler folder, as diffusers' `from_pretrained`."""
        path = Path(pretrained_model_name_or_path)
        return cls.from_config(path / subfolder if subfolder else path, **overrides)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM-family models take x_t as it is (Karras-style schedulers scale here)."""
        return sample

    def _check_timestep(self, timestep) -> int:
        t = self._host_int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the trained range [0, {self.config.num_train_timesteps - 1}]")
        return t

    def _host_int(self, timestep) -> int:
        """int(timestep), without reading the GPU when it is an element of `self.timesteps` (`schedule_value`)."""
        value = schedule_value(self, timestep)
        return int(timestep) if value is None else int(value)

    def _alpha_bar_at(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at `timesteps` (int or (B,) tensor), in like's dtype and device, shaped to broadcast: (B, 1, ..., 1)."""
        # Cast before indexing and before the square roots, as diffusers does: in fp16 the roots round the same way.
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        timesteps = torch.as_tensor(timesteps, device=like.device)
        if timesteps.numel() and not (0 <= int(timesteps.min()) and int(timesteps.max()) < len(alphas_cumprod)):
            # Negative indices would silently wrap around to the noisiest levels.
            raise ValueError(f"timesteps must lie in [0, {len(alphas_cumprod) - 1}], got {timesteps.tolist()}")
        alpha_bar = alphas_cumprod[timesteps].flatten()  # (B,)
        return alpha_bar.reshape(-1, *[1] * (like.ndim - 1))  # (B,) -> (B, 1, ..., 1)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4)."""
        alpha_bar = self._alpha_bar_at(timesteps, original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho, arXiv 2202.00512, section 4).

        `sample` is the clean x_0, as in diffusers.
        """
        alpha_bar = self._alpha_bar_at(timesteps, sample)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * sample
