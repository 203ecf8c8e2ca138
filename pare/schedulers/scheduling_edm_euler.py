"""EDM Euler: the Euler sampler with EDM's own noise levels and preconditioning (no beta schedule at all).

diffusers twin: `schedulers/scheduling_edm_euler.py` (`EDMEulerScheduler`).
Source: Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv 2206.00364: eq. 5 (the sigma schedule), eq. 7 and Table 1 (the preconditioning
c_in, c_out, c_skip, c_noise), Algorithm 2 (the Euler step with churn). Playground v2.5 and the
SDXL-EDM checkpoints ship it.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Sequence

import torch

from ..configuration import ConfigMixin, register_to_config
from .scheduling_utils import Generator, SchedulerOutput, check_choice, randn_tensor
from .sigmas import SigmaSchedulerMixin

logger = logging.getLogger("pare")

SIGMA_SCHEDULES = ("karras", "exponential")
PREDICTION_TYPES = ("epsilon", "v_prediction")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class EDMEulerScheduler(SigmaSchedulerMixin, ConfigMixin):
    """Euler sampling of the EDM ODE with EDM's preconditioned denoiser (Karras et al., arXiv 2206.00364, eq. 7, Algorithm 2).

    diffusers twin: `schedulers/scheduling_edm_euler.py EDMEulerScheduler`; same config keys, defaults
    and numbers (verified by `parity_tests/test_scheduling_edm_euler.py`). It has no betas: the model
    is trained directly on x = x_0 + sigma * eps, so pare builds it on ConfigMixin, not DiscreteScheduler.

    Preconditioning (Table 1, "Ours"), with sigma_data the data's standard deviation:
        c_in = 1 / sqrt(sigma^2 + sigma_data^2)          `precondition_inputs` (via scale_model_input)
        c_noise = log(sigma) / 4                           `precondition_noise` (these are `timesteps`)
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)   (negated for v_prediction)
        D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)   `precondition_outputs`   (eq. 7)

    Config (diffusers' names and defaults): sigma_min (0.002), sigma_max (80), sigma_data (0.5), rho (7),
    sigma_schedule ("karras": eq. 5; "exponential": even in log sigma), num_train_timesteps (the number
    of levels before set_timesteps), prediction_type ("epsilon" or "v_prediction"), final_sigmas_type
    ("zero" or "sigma_min").

    `set_timesteps(sigmas=...)` takes, as diffusers does, the *ramp* in [0, 1] that eq. 5 maps to sigmas
    (i / (N - 1) for the paper's levels), not the sigmas themselves. `init_noise_sigma` is
    sqrt(sigma_max^2 + 1), diffusers' value (the paper's x_0 ~ N(0, sigma_max^2) would be sigma_max):
    kept for parity, since pipelines scale the initial latents by it.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers fails later or
    goes on): set_timesteps with neither num_inference_steps nor sigmas, or with a single float ramp;
    num_inference_steps below 1; unknown config values (diffusers checks sigma_schedule only); a timestep
    not in the schedule. A list ramp is accepted (diffusers needs a tensor). `get_velocity` is not provided.
    A schedule whose first timestep repeats (e.g. Karras levels of the cosine schedule) starts at its first
    level, where diffusers skips one (`SigmaSchedulerMixin._init_step_index`).
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    config_name = "scheduler_config.json"
    order = 1
    _requires_set_timesteps = False  # diffusers' constructor already builds a usable schedule

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        owner = type(self).__name__
        check_choice(owner, "sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
        check_choice(owner, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(owner, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data), ("rho", rho)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                # e.g. an EulerDiscreteScheduler config's sigma_min=None (diffusers: a TypeError in the sigma formula)
                raise ValueError(f"{owner}: {key} must be a number, got {value!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"{owner}: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"{owner}: num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self.num_inference_steps = None
        # num_train_timesteps + 1 levels over the ramp 0, 1/T, ..., 1 (float64, then float32)
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self._set_levels(self._sigmas_from_ramp(ramp).to(torch.float32))
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max**2 + 1) ** 0.5

    # --- the preconditioning (Table 1)

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """c_in x, with c_in = 1 / sqrt(sigma^2 + sigma_data^2): unit-variance network input."""
        c_in = 1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5)
        return sample * c_in

    def precondition_noise(self, sigma) -> torch.Tensor:
        """c_noise = log(sigma) / 4: what the network is told about the noise level (its `timestep`)."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F (eq. 7); c_out changes sign for v_prediction."""
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        if self.config.prediction_type == "epsilon":
            c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        else:  # v_prediction
            c_out = -sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """c_in x at this step's sigma."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = self.precondition_inputs(sample, self.sigmas[self.step_index])
        self.is_scale_input_called = True
        return sample

    # --- the levels

    def _sigmas_from_ramp(self, ramp: torch.Tensor) -> torch.Tensor:
        """The sigma of each ramp value u in [0, 1]: eq. 5, or log-even levels (which use only len(ramp))."""
        c = self.config
        if c.sigma_schedule == "karras":
            # sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho  (eq. 5, u = i / (N - 1))
            min_inv_rho, max_inv_rho = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** c.rho
        # exponential: float32 torch.linspace, as diffusers computes it
        return torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), len(ramp)).exp().flip(0)

    def _set_levels(self, sigmas: torch.Tensor) -> None:
        """timesteps = c_noise(sigmas); sigmas gains the final level (0 or sigma_min)."""
        self.timesteps = self.precondition_noise(sigmas)
        sigma_last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.cat([sigmas, torch.full((1,), fill_value=sigma_last, device=sigmas.device)])
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")  # read step by step on the host: no device syncs

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        """`num_inference_steps` levels over the ramp linspace(0, 1, n), or the levels of a custom ramp `sigmas`."""
        if sigmas is None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(
                    f"EDMEulerScheduler.set_timesteps needs num_inference_steps (an int >= 1) or a ramp `sigmas`, "
                    f"got num_inference_steps={num_inference_steps!r}"
                )
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        else:
            if isinstance(sigmas, (float, int)):
                raise ValueError(f"sigmas={sigmas!r}: give the ramp as a list or 1-D tensor of values in [0, 1], not one number")
            ramp = torch.as_tensor(sigmas).to(torch.float64)
            if ramp.ndim != 1 or len(ramp) == 0:
                raise ValueError(f"sigmas must be a non-empty 1-D ramp of values in [0, 1], got shape {tuple(ramp.shape)}")
        self.num_inference_steps = num_inference_steps  # None with a custom ramp, as in diffusers
        self._set_levels(self._sigmas_from_ramp(ramp).to(dtype=torch.float32, device=device))

    # --- the step

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generator = None,
        return_dict: bool = True,
        pred_original_sample: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple:
        """One Euler step with churn (Karras et al., arXiv 2206.00364, Algorithm 2, lines 4-8, without the 2nd-order correction).

        `pred_original_sample`, if given, replaces D(x; sigma_hat) (diffusers' hook for guidance that
        works on x_0). Arithmetic in float32; prev_sample in model_output's dtype.
        """
        # Notation (Algorithm 2):  sigma -> t_i   sigma_hat -> t_hat_i   pred_original_sample -> D_theta(x_hat_i; t_hat_i)
        #   derivative -> d_i   dt -> t_{i+1} - t_hat_i   prev_sample -> x_{i+1}
        self._check_step_input(model_output, timestep, sample)
        if not self.is_scale_input_called:
            logger.warning("EDMEulerScheduler.step() before scale_model_input(): the model saw an unscaled input")
        if self.step_index is None:
            self._init_step_index(timestep)

        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]

        # 1. gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]; t_hat_i = (1 + gamma_i) t_i  (lines 4-5)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)

        # 2. x_hat_i = x_i + sqrt(t_hat_i^2 - t_i^2) eps_i, eps_i ~ N(0, S_noise^2 I)  (line 6)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            eps = noise * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5

        # 3. D(x_hat_i; t_hat_i) = c_skip x + c_out F  (eq. 7)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, model_output, sigma_hat)

        # 4. d_i = (x_hat_i - D) / t_hat_i; x_{i+1} = x_hat_i + (t_{i+1} - t_hat_i) d_i  (lines 7-8)
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
