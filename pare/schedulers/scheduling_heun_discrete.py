"""Heun: Karras et al.'s 2nd-order deterministic sampler (an Euler step, then the trapezoidal correction).

diffusers twin: `schedulers/scheduling_heun_discrete.py` (`HeunDiscreteScheduler`).
Source: Karras, Aittala, Aila & Laine, arXiv 2206.00364, Algorithm 1 (deterministic sampling with
Heun's 2nd-order method), eq. 5 for the Karras sigmas; k-diffusion's `sample_heun`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .scheduling_utils import DiscreteScheduler, SchedulerOutput
from .sigmas import (
    SigmaSchedulerMixin,
    check_custom_float_timesteps,
    convert_sigmas,
    float_spaced_timesteps,
    timesteps_for_sigmas,
    train_sigmas,
)


class HeunDiscreteScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Heun's method in sigma space, two model evaluations per noise level (Karras et al., arXiv 2206.00364, Algorithm 1).

    diffusers twin: `schedulers/scheduling_heun_discrete.py HeunDiscreteScheduler`; same config keys,
    defaults and numbers (verified by `parity_tests/test_scheduling_heun_discrete.py`).

    The pipeline's loop sees each inner timestep twice: `timesteps` is [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]
    (2n - 1 entries) and `sigmas` [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]. A step at an odd position is the
    correction of the step before it; the last level (to sigma = 0) is a plain Euler step, as line 8 of
    Algorithm 1 prescribes. `order = 2` tells pipelines so.

    Config (diffusers' names and defaults; note the beta defaults 0.00085 / 0.012, SD's):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
        "squaredcos_cap_v2", "exp"), trained_betas; prediction_type ("epsilon", "v_prediction",
        "sample"); use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one);
        clip_sample, clip_sample_range (clamp the predicted x_0); timestep_spacing, steps_offset.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on):
    num_inference_steps of 0 or below; custom timesteps out of range or
    not descending; unknown config values; a timestep not in the schedule. "trailing" spacing never
    gains diffusers' spurious extra timestep -1. `get_velocity` is not provided.
    A schedule whose first timestep repeats (e.g. Karras levels of the cosine schedule) starts at its first
    level, where diffusers skips one (`SigmaSchedulerMixin._init_step_index`).
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    integer_timesteps_allowed = True  # looked up in the float schedule, as diffusers does
    order = 2
    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._build_betas()
        # diffusers starts with a full-length schedule (so that add_noise works before set_timesteps).
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (diffusers' rule)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step is an Euler step (not the correction of one)."""
        return self.dt is None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1): the DDPM x_t the model was trained on."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """`num_inference_steps` noise levels (or custom `timesteps`), each inner one visited twice."""
        c = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("set_timesteps needs exactly one of `num_inference_steps` or `timesteps`")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of `num_inference_steps` or `timesteps` to set_timesteps")
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and c[option]:
                raise ValueError(f"custom `timesteps` cannot be combined with config.{option}=True, which chooses the sigmas itself")
        T = num_train_timesteps or c.num_train_timesteps

        # 1. timesteps: custom, or spaced per timestep_spacing
        if timesteps is not None:
            timesteps = check_custom_float_timesteps(timesteps, c.num_train_timesteps)
            num_inference_steps = len(timesteps)
        else:
            timesteps = float_spaced_timesteps(c.timestep_spacing, num_inference_steps, T, c.steps_offset)
        self.num_inference_steps = int(num_inference_steps)

        # 2. their sigmas, interpolated between training timesteps; optionally respaced (Karras eq. 5, ...)
        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        respaced = convert_sigmas(c, sigmas, self.num_inference_steps)
        if respaced is not None:
            sigmas, timesteps = respaced, timesteps_for_sigmas(respaced, log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)

        # 3. every inner level twice: [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0] and [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)

        self.prev_derivative = None  # d_i of the Euler step, kept for the correction
        self.dt = None  # t_{i+1} - t_i
        self.sample = None  # x_i
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")  # read step by step on the host: no device syncs

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Half of a Heun step (Karras et al., arXiv 2206.00364, Algorithm 1): the Euler predictor, or its correction.

        Arithmetic in the inputs' dtype, as diffusers does.
        """
        # Notation (Algorithm 1):  sigma -> t_i   sigma_next -> t_{i+1}   pred_original_sample -> D_theta(x; t)
        #   derivative -> d_i (Euler) or d'_i (correction)   prev_sample -> x_{i+1}
        self._check_step_input(model_output, timestep, sample)
        if self.step_index is None:
            self._init_step_index(timestep)

        # 1. the two levels of this half-step
        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]
        sigma_hat = sigma  # no churn: Algorithm 1 is Algorithm 2 with gamma_i = 0

        # 2. D(x; sigma) at the level the model just saw (t_i for the predictor, t_{i+1} for the correction)
        sigma_input = sigma_hat if self.state_in_first_order else sigma_next
        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_input * model_output
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + (sample / (sigma_input**2 + 1))
        else:  # sample
            pred_original_sample = model_output
        if self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if self.state_in_first_order:
            # 3a. Euler: d_i = (x_i - D(x_i; t_i)) / t_i, x_{i+1} = x_i + (t_{i+1} - t_i) d_i  (lines 4-5)
            derivative = (sample - pred_original_sample) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            # 3b. correction: d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1};
            #     x_{i+1} = x_i + (t_{i+1} - t_i) (d_i / 2 + d'_i / 2)  (lines 7-8)
            derivative = (sample - pred_original_sample) / sigma_next
            derivative = (self.prev_derivative + derivative) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None

        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
