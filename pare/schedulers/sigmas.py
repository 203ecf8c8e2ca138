"""Sigma space: what every Karras / k-diffusion style scheduler shares.

These schedulers do not walk the DDPM chain x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
they walk the variance-exploding form x = x_0 + sigma * eps, with

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)        (Karras et al., arXiv 2206.00364, Table 1, "VP")

so that x_sigma = x_t / sqrt(alpha_bar_t). The model still wants its DDPM input, hence
`scale_model_input` divides by sqrt(sigma^2 + 1).

diffusers twin: the methods diffusers copies into each of these schedulers
(`schedulers/scheduling_euler_discrete.py` `EulerDiscreteScheduler._convert_to_karras`,
`_convert_to_exponential`, `_convert_to_beta`, `_sigma_to_t`, `index_for_timestep`,
`_init_step_index`, `add_noise`, and `set_begin_index` from `scheduling_dpmsolver_multistep.py`).
pare writes each once. The numpy dtypes (float64 here, float32 there) are diffusers' own: the
schedules must agree bit for bit, because a sigma one ulp off moves every later step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..configuration import Config
from .schedule import (
    TIMESTEP_SPACINGS,
    betas_for_alpha_bar,
    check_num_inference_steps,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)
from .scheduling_utils import check_choice, host_schedule, schedule_value

SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


# --- noise levels ---------------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """The noise levels of Karras et al., arXiv 2206.00364, eq. 5 (float64, descending):

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N

    rho = 7 is the paper's choice ("rho = 7 ... performs well", section 3). N = 1 gives [sigma_max].
    """
    ramp = np.linspace(0, 1, num_inference_steps)  # i / (N - 1)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)  # Python floats, as in diffusers
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma, from sigma_max down to sigma_min (float64)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """Noise levels at the quantiles of a Beta(alpha, beta) distribution (Lee et al., "Beta Sampling is All
    You Need", arXiv 2407.12173, section 3.2): dense near both ends of the schedule, sparse in the middle.

        sigma_i = sigma_min + F^-1(1 - i / (N - 1)) * (sigma_max - sigma_min),   F = the Beta(alpha, beta) CDF

    Needs scipy (for the Beta quantile function), imported here only, as diffusers does.
    """
    try:
        import scipy.stats
    except ImportError:
        raise ImportError(
            "use_beta_sigmas=True needs scipy for the Beta distribution's quantile function: pip install scipy "
            "(or use use_karras_sigmas / use_exponential_sigmas, which need nothing extra)"
        ) from None
    # One ppf call per level, as diffusers makes them: the vectorised call may round differently.
    quantiles = [scipy.stats.beta.ppf(u, alpha, beta) for u in 1 - np.linspace(0, 1, num_inference_steps)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep whose noise level is `sigma`: linear interpolation in log sigma.

    `log_sigmas` are the log noise levels of the training timesteps 0 .. T-1 (ascending). `sigma` is a
    numpy scalar or array; the result has its shape. Levels outside the trained range clamp to 0 or T-1.

    The operations are numpy's, applied to whatever arrays come in: KDPM2 passes 0-dim torch tensors
    and a torch `log_sigmas`, as diffusers does, and gets diffusers' (partly float32 torch) rounding.
    """
    log_sigma = np.log(np.maximum(sigma, 1e-10))  # sigma = 0 (the last level) -> a very small one
    # 1. the last training timestep whose log sigma is <= log_sigma (at most T-2, so that low + 1 exists)
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, *sigma.shape)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    # 2. interpolate between its neighbours, linearly in log sigma
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def check_sigma_options(owner: str, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas) -> None:
    """At most one of the three sigma spacings may be on (diffusers raises the same)."""
    chosen = [name for name, on in zip(SIGMA_OPTIONS, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{owner}: only one of {SIGMA_OPTIONS} can be True, but the config sets {chosen}")


def sigma_range(config: Config, in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max): the config's `sigma_min` / `sigma_max` where it has them, else the ends of `in_sigmas`."""
    sigma_min, sigma_max = config.get("sigma_min"), config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return sigma_min, sigma_max


def convert_sigmas(config: Config, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray | None:
    """`num_inference_steps` Karras / exponential / beta levels spanning `in_sigmas` (or the config's range),
    per the config's `use_*_sigmas` flag; None when none is set."""
    if config.get("use_karras_sigmas"):
        return karras_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    if config.get("use_exponential_sigmas"):
        return exponential_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    if config.get("use_beta_sigmas"):
        return beta_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    return None


def timesteps_for_sigmas(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each level (float64), one `sigma_to_t` call per level as diffusers makes them."""
    return np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T-1 (float32 numpy, ascending)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def float_spaced_timesteps(
    timestep_spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0
) -> np.ndarray:
    """The timesteps sigma schedulers visit (float32 numpy, descending): Lin et al., arXiv 2305.08891, Table 2.

    "trailing" is `schedule.spaced_timesteps`' (with its fix of diffusers' overshoot to an extra
    timestep -1). "linspace" is *not* rounded: diffusers' sigma schedulers keep np.linspace(0, T-1, n)
    in float32 and interpolate sigma between training steps. "leading" with steps_offset may reach
    T (n = T, steps_offset = 1, as Heun's and LMS's constructors ask for with SD's configs): unlike
    DDIM, nothing is indexed by it, np.interp clamps its sigma to the last training level, and pare
    keeps diffusers' behaviour.
    """
    T, n = num_train_timesteps, check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
    return spaced_timesteps(timestep_spacing, n, T).numpy().astype(np.float32)


# --- the shared state -----------------------------------------------------------------------------


class SigmaSchedulerMixin:
    """Step-index bookkeeping, the beta schedule and the forward process x = x_0 + sigma * eps.

    A scheduler walks `self.sigmas` by index: `step_index` counts the `step` calls since
    `set_timesteps`. It starts at `begin_index` when a pipeline has set one (img2img and
    inpainting start part-way, after `add_noise`), else at the position of the first timestep
    seen in `self.timesteps`. diffusers twin: the same-named methods of `EulerDiscreteScheduler`.
    """

    beta_schedules: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
    prediction_types: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
    _step_index: int | None = None
    _begin_index: int | None = None
    start_at_first_timestep = False  # see _init_step_index; True departs from diffusers where the first timestep repeats
    integer_timesteps_allowed = False  # diffusers' Euler, Euler a and EDM refuse ints (loop indices); Heun, KDPM2, LMS look them up
    _requires_set_timesteps = True  # False where the constructor already builds a schedule `step` can walk

    # --- construction

    def _build_betas(self) -> None:
        """Check the config keys shared by sigma schedulers; compute betas, alphas, alphas_cumprod (float32, CPU)."""
        c, owner = self.config, type(self).__name__
        check_choice(owner, "beta_schedule", c.beta_schedule, self.beta_schedules)
        check_choice(owner, "prediction_type", c.prediction_type, self.prediction_types)
        if "timestep_spacing" in c:
            check_choice(owner, "timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
        if isinstance(c.num_train_timesteps, bool) or not isinstance(c.num_train_timesteps, int) or c.num_train_timesteps < 2:
            raise ValueError(f"{owner}: num_train_timesteps must be an int >= 2, got {c.num_train_timesteps!r}")
        if not isinstance(c.get("steps_offset", 0), int) or c.get("steps_offset", 0) < 0:
            raise ValueError(f"{owner}: steps_offset must be a non-negative int, got {c.steps_offset!r}")
        check_sigma_options(owner, *(c.get(name, False) for name in SIGMA_OPTIONS))
        if c.get("use_beta_sigmas"):
            try:
                import scipy  # noqa: F401
            except ImportError:
                raise ImportError(f"{owner}: use_beta_sigmas=True needs scipy: pip install scipy") from None
        if c.trained_betas is not None:
            if len(c.trained_betas) != c.num_train_timesteps:
                raise ValueError(
                    f"{owner}: trained_betas has {len(c.trained_betas)} values but num_train_timesteps={c.num_train_timesteps}"
                )
            if not isinstance(c.trained_betas, list):  # a list of floats, so that save_config writes valid JSON
                object.__setattr__(self, "_pare_config", Config({**c, "trained_betas": [float(b) for b in c.trained_betas]}))
                c = self.config

        if c.trained_betas is None and c.beta_schedule == "exp":  # Heun's extra: alpha_bar(t) = exp(-12 t)
            self.betas = betas_for_alpha_bar(c.num_train_timesteps, alpha_transform_type="exp")
        else:
            self.betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        if c.get("rescale_betas_zero_snr"):
            self.betas = rescale_zero_terminal_snr(self.betas)
        if not bool(((self.betas >= 0) & (self.betas <= 1)).all()):
            raise ValueError(f"{owner}: every beta must lie in [0, 1]; this config gives {self.betas.min():.3g} .. {self.betas.max():.3g}")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **overrides):
        """Build from a pipeline folder (`subfolder="scheduler"`) or a scheduler folder, as diffusers' `from_pretrained`."""
        path = Path(pretrained_model_name_or_path)
        return cls.from_config(path / subfolder if subfolder else path, **overrides)

    # --- the step index

    @property
    def step_index(self) -> int | None:
        """Which entry of `sigmas` the next `step` uses; None until the first `scale_model_input` / `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where the first step starts, when a pipeline set it with `set_begin_index`; None otherwise."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the walk at `begin_index` (img2img: strength skips the first steps). Call before the loop."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The position of `timestep` in the schedule.

        Where it occurs more than once (the duplicated timesteps of 2nd-order schedulers, or a
        schedule that starts part-way), the *second* match: starting at the first would skip a
        sigma when img2img starts mid-schedule (diffusers' rule, kept for parity).
        """
        value = schedule_value(self, timestep) if schedule_timesteps is None else None
        if value is not None:  # an element of the schedule: matched in its host copy, without reading the GPU
            matches = [i for i, v in enumerate(host_schedule(self)) if v == value]
            return matches[1 if len(matches) > 1 else 0]
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            shown = schedule_timesteps.tolist()
            raise ValueError(
                f"timestep {float(timestep)!r} is not one of this scheduler's timesteps "
                f"({shown[:4]}{' ...' if len(shown) > 4 else ''}): pass a value from scheduler.timesteps"
            )
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        """Where the walk starts: `begin_index` if set, else the position of `timestep` (diffusers' rule).

        With `start_at_first_timestep` (the Karras-family schedulers of this package set it), the
        schedule's own first timestep starts at position 0 even where it repeats later (levels above the
        trained range all map to timestep T-1, or Karras levels of the cosine schedule round to the same
        timestep). diffusers' second-match rule then skips a level, misaligns every later step, and runs
        off the end of `sigmas` (IndexError) or into NaN; elsewhere the two rules agree. diffusers' SDXL
        pipeline avoids it by calling set_begin_index(0); its SD 1.x pipeline does not.
        """
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        value = schedule_value(self, timestep)  # an element of the schedule (the loop's): compared on the host
        if value is None and isinstance(timestep, torch.Tensor):
            timestep = timestep.to(self.timesteps.device)
        if self.start_at_first_timestep and (host_schedule(self)[0] == value if value is not None else
                                            len(self.timesteps) and bool(self.timesteps[0] == timestep)):
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

    # --- the forward process

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + sigma * eps at the noise level of each timestep (Karras et al., arXiv 2206.00364, eq. 1 / Table 1).

        Which level: the timestep's position in the schedule before the loop has begun (training,
        or `begin_index` unset); `begin_index` when a pipeline set it (img2img); the current
        `step_index` once stepping has begun (inpainting re-noises the known region every step).
        """
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = torch.as_tensor(timesteps).to(original_samples.device).reshape(-1)  # (B,)
        if self.begin_index is None:
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:
            step_indices = [self.step_index] * timesteps.shape[0]
        else:
            step_indices = [self.begin_index] * timesteps.shape[0]
        sigma = sigmas[step_indices].flatten()
        sigma = sigma.reshape(-1, *[1] * (original_samples.ndim - 1))  # (B,) -> (B, 1, ..., 1)
        return original_samples + noise * sigma

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Not provided: the v-prediction target belongs to training, on the DDPM chain (DDPMScheduler.get_velocity).

        Of diffusers' sigma schedulers only Euler has one, and it indexes alphas_cumprod by the step's
        position in the schedule, not by its timestep.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.get_velocity is not provided: compute v-prediction training targets with "
            "DDPMScheduler.get_velocity (diffusers' EulerDiscreteScheduler.get_velocity indexes alphas_cumprod by step position)"
        )

    def _start_step(self, timestep) -> tuple[int, int]:
        """(step index, number of steps) for a multistep solver's `step`, after the errors it raises first:
        no set_timesteps() yet, or every step already taken. The first call finds the index from `timestep`."""
        owner = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{owner}.step() was called before set_timesteps(): call scheduler.set_timesteps(num_inference_steps) first")
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self.step_index, len(self.timesteps)
        if i >= n:
            raise ValueError(f"{owner}.step(): all {n} steps are done; call set_timesteps() again to sample anew")
        return i, n

    def _check_step_input(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> None:
        """The errors every sigma scheduler's `step` raises before it does anything."""
        owner = type(self).__name__
        if self._requires_set_timesteps and self.num_inference_steps is None:
            raise ValueError(f"{owner}.step() was called before set_timesteps(): call scheduler.set_timesteps(num_inference_steps) first")
        if not self.integer_timesteps_allowed and (
            isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point())
        ):
            # diffusers' error: an int is almost always a loop index from enumerate(timesteps).
            raise ValueError(
                f"{owner}.step() got the integer timestep {timestep!r}: passing integer indices (e.g. from "
                "enumerate(timesteps)) is not supported; pass one of scheduler.timesteps"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def check_custom_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    """User-given sigmas as float32, checked: at least two (a start and an end), finite, non-negative, non-increasing."""
    sigmas = np.array(sigmas).astype(np.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a list of at least 2 noise levels (the last is where sampling ends), got {sigmas.tolist()}")
    if not np.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if (np.diff(sigmas) > 0).any():
        raise ValueError(f"sigmas must not increase (sampling goes from noise to data), got {sigmas.tolist()}")
    if (sigmas[:-1] == 0).any():
        # diffusers divides by these and returns NaN; only the end of the schedule may be noise-free.
        raise ValueError(f"only the last of sigmas may be 0 (each step divides by its sigma), got {sigmas.tolist()}")
    return sigmas


def check_custom_float_timesteps(timesteps: Sequence[float], num_train_timesteps: int) -> np.ndarray:
    """User-given timesteps as float32, checked: non-empty, strictly descending, within [0, T-1]."""
    timesteps = np.array(timesteps).astype(np.float32)
    if timesteps.ndim != 1 or len(timesteps) == 0:
        raise ValueError(f"timesteps must be a non-empty list of training timesteps, got {timesteps.tolist()}")
    if (np.diff(timesteps) >= 0).any():
        raise ValueError(f"timesteps must be strictly descending, got {timesteps.tolist()}")
    if timesteps[0] > num_train_timesteps - 1 or timesteps[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got {timesteps[0]} .. {timesteps[-1]}"
        )
    return timesteps
