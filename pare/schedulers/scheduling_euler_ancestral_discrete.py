"""Euler ancestral ("Euler a"): an Euler step down to sigma_down, then fresh noise back up to sigma_{i+1}.

diffusers twin: `schedulers/scheduling_euler_ancestral_discrete.py` (`EulerAncestralDiscreteScheduler`).
Source: k-diffusion's `sample_euler_ancestral` and `get_ancestral_step` (k_diffusion/sampling.py),
the ancestral form of the Euler step of Karras et al., arXiv 2206.00364, Algorithm 2; the split of
the variance follows DDPM's ancestral sampling (Ho et al., arXiv 2006.11239, Algorithm 2).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from .scheduling_utils import DiscreteScheduler, Generator, SchedulerOutput, randn_tensor, to_device
from .sigmas import SigmaSchedulerMixin, float_spaced_timesteps, train_sigmas

logger = logging.getLogger("pare")


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion's `get_ancestral_step`, eta = 1).

    sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 is the variance DDPM's posterior
    q(x_{t-1} | x_t, x_0) adds, written in sigma space; the deterministic step goes to
    sigma_down = sqrt(sigma_to^2 - sigma_up^2), which is exactly sigma_to^2 / sigma_from.
    Works elementwise on tensors of levels (KDPM2 ancestral passes whole schedules).
    """
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    down_squared = sigma_to**2 - sigma_up**2
    # diffusers takes the square root of this difference, which cancels catastrophically when sigma_from >> sigma_to
    # (the cosine schedule's sigma_max ~ 2e4 with few steps): it rounds to 0 or below, giving sigma_down = 0 or NaN,
    # and KDPM2 ancestral's log-midpoint of 0 is NaN. pare keeps diffusers' value wherever the difference is
    # positive, and uses the exact sigma_to^2 / sigma_from where it is not.
    sigma_down = torch.where(down_squared > 0, down_squared.clamp(min=0) ** 0.5, sigma_to**2 / sigma_from)
    return sigma_down, sigma_up


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Ancestral Euler sampling in sigma space (k-diffusion `sample_euler_ancestral`; Karras et al., arXiv 2206.00364).

    diffusers twin: `schedulers/scheduling_euler_ancestral_discrete.py EulerAncestralDiscreteScheduler`;
    same config keys, defaults and numbers (verified by `parity_tests/test_scheduling_euler_ancestral_discrete.py`).
    SDXL-Turbo ships this scheduler (with "trailing" spacing).

    Config (diffusers' names and defaults): num_train_timesteps, beta_start, beta_end, beta_schedule
    ("linear", "scaled_linear", "squaredcos_cap_v2"), trained_betas, rescale_betas_zero_snr;
    prediction_type ("epsilon" or "v_prediction"); timestep_spacing, steps_offset.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on or fails
    later): prediction_type="sample" is refused when the config is read (diffusers accepts the config
    and raises NotImplementedError in `step`); num_inference_steps of 0 or below;
    `step` before `set_timesteps`; unknown config values; a timestep not in the schedule. "trailing"
    spacing never gains diffusers' spurious extra timestep -1. Where diffusers' sigma_down rounds to 0
    or NaN (catastrophic cancellation, see `get_ancestral_step`), pare's is the exact sigma_to^2 / sigma_from.
    `get_velocity` is not provided.
    A schedule whose first timestep repeats (e.g. Karras levels of the cosine schedule) starts at its first
    level, where diffusers skips one (`SigmaSchedulerMixin._init_step_index`).
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    prediction_types = ("epsilon", "v_prediction")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._build_betas()
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # a finite sigma_max (4096) at zero SNR, as diffusers does
        sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        T = num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy())  # float64, as in diffusers
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (diffusers' rule)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1): the DDPM x_t the model was trained on."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample / ((sigma**2 + 1) ** 0.5)
        self.is_scale_input_called = True
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """`num_inference_steps` timesteps per `timestep_spacing` and their sigmas (interpolated), then 0."""
        c = self.config
        timesteps = float_spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")  # read step by step on the host: no device syncs
        self.timesteps = to_device(torch.from_numpy(timesteps), device)
        self.num_inference_steps = int(num_inference_steps)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step sigma_i -> sigma_{i+1}: Euler to sigma_down, then noise of std sigma_up.

        The noise is drawn from `generator` in model_output's dtype, as diffusers draws it; the
        arithmetic is float32; prev_sample comes back in model_output's dtype.
        """
        # Notation (k-diffusion's sample_euler_ancestral):
        #   sigma -> sigmas[i]   pred_original_sample -> denoised   derivative -> d = to_d(x, sigma, denoised)
        #   sigma_down, sigma_up -> get_ancestral_step(sigmas[i], sigmas[i + 1])
        self._check_step_input(model_output, timestep, sample)
        if not self.is_scale_input_called:
            logger.warning("EulerAncestralDiscreteScheduler.step() before scale_model_input(): the model saw an unscaled input")
        if self.step_index is None:
            self._init_step_index(timestep)

        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)

        # 1. the denoised D(x; sigma) (EDM, arXiv 2206.00364, Table 1, VP preconditioning)
        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))

        # 2. split sigma_{i+1}^2 into a deterministic part sigma_down^2 and fresh noise sigma_up^2
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma_from, sigma_to)

        # 3. Euler to sigma_down: d = (x - D) / sigma; x <- x + (sigma_down - sigma) d  (Algorithm 2, lines 7-8)
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt

        # 4. x_{i+1} = x + sigma_up z, z ~ N(0, I)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample + noise * sigma_up
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
