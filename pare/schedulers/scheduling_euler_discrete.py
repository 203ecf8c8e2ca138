"""Euler: the first-order ODE sampler in sigma space, with optional "churn" (Karras et al.'s stochastic sampler).

diffusers twin: `schedulers/scheduling_euler_discrete.py` (`EulerDiscreteScheduler`).
Source: Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv 2206.00364: Algorithm 2 (its Euler step, without the 2nd-order correction), eq. 5
(the Karras sigmas); and k-diffusion's `sample_euler` (k_diffusion/sampling.py).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from .scheduling_utils import DiscreteScheduler, Generator, SchedulerOutput, check_choice, randn_tensor, to_device
from .sigmas import (
    SigmaSchedulerMixin,
    check_custom_float_timesteps,
    check_custom_sigmas,
    convert_sigmas,
    float_spaced_timesteps,
    timesteps_for_sigmas,
    train_sigmas,
)

logger = logging.getLogger("pare")

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class EulerDiscreteScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Euler steps x_{i+1} = x_i + (sigma_{i+1} - sigma_hat) d_i in sigma space (Karras et al., arXiv 2206.00364, Algorithm 2).

    diffusers twin: `schedulers/scheduling_euler_discrete.py EulerDiscreteScheduler`; same config keys,
    defaults and numbers (verified by `parity_tests/test_scheduling_euler_discrete.py`).

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
        "squaredcos_cap_v2"), trained_betas, rescale_betas_zero_snr: the training noise schedule.
        prediction_type: "epsilon", "sample" (alias "original_sample") or "v_prediction".
        interpolation_type: sigma at fractional timesteps by "linear" interpolation of the training
            sigmas, or "log_linear": n + 1 levels evenly spaced in log sigma over the training range.
        use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one), sigma_min, sigma_max:
            respace the levels (eq. 5 of the paper, log-even, or Beta quantiles) between sigma_min and sigma_max
            (default: the ends of the interpolated schedule).
        timestep_spacing, steps_offset: which timesteps are visited ("linspace" keeps fractional timesteps).
        timestep_type: "discrete" (the model sees the training timestep) or "continuous" (with v_prediction,
            the model sees c_noise = log(sigma) / 4, EDM's Table 1).
        final_sigmas_type: where the last step lands: "zero" (noise-free) or "sigma_min" (the smallest
            training sigma).

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on):
    num_inference_steps of 0 or below; custom timesteps out of range or
    not descending; custom sigmas that increase, are negative, or are 0 before the last; unknown config
    values (diffusers raises only for beta_schedule, as NotImplementedError); a timestep not in the
    schedule (diffusers: IndexError). A schedule whose first timestep repeats (sigma_max above the largest
    trained sigma) starts at its first level, where diffusers skips one and fails at the last step (see
    `SigmaSchedulerMixin._init_step_index`). "trailing" spacing never gains diffusers' spurious extra timestep
    -1 (see `schedule.spaced_timesteps`). `get_velocity` is not provided: diffusers' indexes
    alphas_cumprod by the step's position instead of its timestep; train with DDPMScheduler's.
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    prediction_types = ("epsilon", "sample", "original_sample", "v_prediction")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        owner = type(self).__name__
        check_choice(owner, "interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        check_choice(owner, "timestep_type", timestep_type, TIMESTEP_TYPES)
        check_choice(owner, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        self._build_betas()
        if rescale_betas_zero_snr:
            # sigma = sqrt((1 - alpha_bar) / alpha_bar) is infinite at zero SNR: diffusers (and pare)
            # replace alpha_bar_{T-1} = 0 by 2^-24, so sigma_max = 4096 (its comment: "close to 0 without being 0").
            self.alphas_cumprod[-1] = 2**-24

        # Training sigmas, noisiest first, and the timesteps T-1 .. 0 (float32).
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        T = self.config.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).to(dtype=torch.float32)
        self.timesteps = self._continuous_timesteps(sigmas) if self._uses_continuous_timesteps() else timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False

    def _uses_continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        """c_noise(sigma) = log(sigma) / 4 (EDM, arXiv 2206.00364, Table 1), one level at a time as diffusers computes it."""
        return torch.Tensor([0.25 * sigma.log() for sigma in sigmas]).to(sigmas.device)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The scale of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (diffusers' rule)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1): back to the DDPM x_t the model was trained on (EDM Table 1, c_in for VP)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample / ((sigma**2 + 1) ** 0.5)
        self.is_scale_input_called = True
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Choose the levels to sample with: `num_inference_steps` spaced ones, or custom `timesteps` or `sigmas`.

        Sets `self.timesteps` (float32; what the model sees) and `self.sigmas` (float32, CPU, one longer:
        the level each step lands on last).
        """
        c = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of `timesteps` or `sigmas` to set_timesteps, not both")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("set_timesteps needs exactly one of `num_inference_steps`, `timesteps` or `sigmas`")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("pass only one of `num_inference_steps`, `timesteps` or `sigmas` to set_timesteps")
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and c[option]:
                raise ValueError(f"custom `timesteps` cannot be combined with config.{option}=True, which chooses the sigmas itself")
        if timesteps is not None and self._uses_continuous_timesteps():
            raise ValueError(
                "custom `timesteps` cannot be combined with timestep_type='continuous' and prediction_type='v_prediction': "
                "those timesteps are log(sigma) / 4; pass `sigmas` instead"
            )

        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        train = train_sigmas(self.alphas_cumprod)  # (T,) float32, ascending in t
        log_sigmas = np.log(train)

        if sigmas is not None:
            # 1a. custom sigmas: their timesteps by log-sigma interpolation; the last sigma is where sampling ends
            sigmas = check_custom_sigmas(sigmas)
            timesteps = timesteps_for_sigmas(sigmas[:-1], log_sigmas)
        else:
            # 1b. timesteps: custom, or spaced per timestep_spacing
            if timesteps is not None:
                timesteps = check_custom_float_timesteps(timesteps, c.num_train_timesteps)
            else:
                timesteps = float_spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
            # 2. their sigmas, interpolated between training timesteps
            if c.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            else:  # log_linear: n + 1 levels evenly spaced in log sigma, computed in float32 torch as diffusers does
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), num_inference_steps + 1).exp().numpy()
            # 3. optionally respaced (Karras eq. 5, exponential, beta); the timesteps follow the sigmas
            respaced = convert_sigmas(c, sigmas, num_inference_steps)
            if respaced is not None:
                sigmas, timesteps = respaced, timesteps_for_sigmas(respaced, log_sigmas)
            # 4. the level after the last step
            sigma_last = float(train[0]) if c.final_sigmas_type == "sigma_min" else 0.0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        sigmas = torch.from_numpy(sigmas).to(torch.float32)  # diffusers sends them to the device and back: same values
        if self._uses_continuous_timesteps():  # c_noise's float32 log on the device, where diffusers takes it
            self.timesteps = self._continuous_timesteps(sigmas[:-1].to(device)).to(device=device)
        else:
            self.timesteps = to_device(torch.from_numpy(timesteps.astype(np.float32)), device)
        self.num_inference_steps = int(num_inference_steps)
        self._step_index = None
        self._begin_index = None
        self.sigmas = sigmas  # read step by step on the host: no device syncs

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
    ) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1} (Karras et al., arXiv 2206.00364, Algorithm 2, lines 4-8).

        With s_churn > 0 and s_tmin <= sigma_i <= s_tmax, noise first raises the level to
        sigma_hat = (1 + gamma) sigma_i (lines 4-6; the noise is drawn from `generator` in
        model_output's dtype, as diffusers draws it). The arithmetic is float32 whatever the inputs;
        prev_sample comes back in model_output's dtype.
        """
        # Notation (diffusers' names -> the paper's, Algorithm 2):
        #   sigma -> t_i   sigma_hat -> t_hat_i   pred_original_sample -> D_theta(x_hat_i; t_hat_i)
        #   derivative -> d_i   dt -> t_{i+1} - t_hat_i   prev_sample -> x_{i+1}
        self._check_step_input(model_output, timestep, sample)
        if not self.is_scale_input_called:
            logger.warning("EulerDiscreteScheduler.step() before scale_model_input(): the model saw an unscaled input")
        if self.step_index is None:
            self._init_step_index(timestep)

        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]

        # 1. churn: gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0  (Algorithm 2, line 4)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)  # t_hat_i = t_i + gamma_i t_i (line 5)

        # 2. x_hat_i = x_i + sqrt(t_hat_i^2 - t_i^2) eps_i, eps_i ~ N(0, S_noise^2 I)  (line 6)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            eps = noise * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5

        # 3. the denoised D(x_hat; sigma) from the model output (EDM Table 1, VP preconditioning)
        prediction_type = self.config.prediction_type
        if prediction_type in ("sample", "original_sample"):
            pred_original_sample = model_output
        elif prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # v_prediction: D = c_skip x + c_out v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))

        # 4. d_i = (x_hat_i - D(x_hat_i; t_hat_i)) / t_hat_i  (line 7; the ODE of eq. 1 with sigma(t) = t)
        derivative = (sample - pred_original_sample) / sigma_hat

        # 5. x_{i+1} = x_hat_i + (t_{i+1} - t_hat_i) d_i  (line 8)
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
