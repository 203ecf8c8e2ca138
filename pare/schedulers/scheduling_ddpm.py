"""DDPM: ancestral sampling from the learned reverse process, and the forward process used in training.

diffusers twin: `schedulers/scheduling_ddpm.py` (`DDPMScheduler`).
Sources: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239
(eq. 4: q(x_t | x_0); eq. 6-7: the posterior q(x_{t-1} | x_t, x_0); Algorithm 2: sampling);
learned variances: Nichol & Dhariwal, "Improved DDPM", arXiv 2102.09672, eq. 15.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from .schedule import BETA_SCHEDULES, check_custom_timesteps, spaced_timesteps
from .scheduling_utils import (
    DiscreteScheduler,
    Generator,
    SchedulerOutput,
    check_choice,
    clip_or_threshold,
    host_schedule,
    pred_original_and_epsilon,
    randn_tensor,
    to_device,
)

# How sigma_t of x_{t-1} = mu + sigma_t z is chosen (Ho et al. section 3.2; Nichol & Dhariwal section 3.1).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


class DDPMScheduler(DiscreteScheduler):
    """DDPM ancestral sampling, Ho et al. (arXiv 2006.11239), Algorithm 2; any subsequence of timesteps.

    diffusers twin: `schedulers/scheduling_ddpm.py DDPMScheduler`; same config keys, defaults,
    and numbers (verified by `parity_tests/test_scheduling_ddpm.py`).

    Config: as `DDIMScheduler` (without `set_alpha_to_one`: past the last step alpha_bar is 1),
    plus `variance_type` (one of `VARIANCE_TYPES`) and two more beta schedules, "sigmoid" and
    "laplace". With `variance_type` "learned" or "learned_range" the model outputs 2C channels:
    the prediction, then the variance (as a variance, or as Improved DDPM's interpolation v).

    Where pare differs from diffusers on purpose: bad input raises a ValueError where diffusers
    goes on or fails obscurely (num_inference_steps <= 0, empty custom timesteps, a timestep not in
    `self.timesteps`, a learned variance type with a C-channel model output, epsilon-prediction at
    zero SNR); "fixed_large_log" gives sigma_t = exp(0.5 log beta_t), where diffusers takes the square
    root of the log and returns NaN; and "trailing" spacing never gains diffusers' extra timestep -1.
    As in diffusers, `step()` works before `set_timesteps()`: it then walks the full training chain t -> t-1.
    """

    beta_schedules = BETA_SCHEDULES

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice(type(self).__name__, "variance_type", variance_type, VARIANCE_TYPES)
        self._build_schedule()
        self.one = torch.tensor(1.0)  # alpha_bar after the last step: x_0 is noise-free
        self.custom_timesteps = False

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the timesteps to sample with: `num_inference_steps` spaced by the config, or your own `timesteps`."""
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps() takes exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            self.timesteps = check_custom_timesteps(timesteps, c.num_train_timesteps)
            self.custom_timesteps = True
            # diffusers leaves num_inference_steps as it was here; pare records the count.
            self.num_inference_steps = len(self.timesteps)
        else:
            self.timesteps = spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
            self.custom_timesteps = False
            self.num_inference_steps = int(num_inference_steps)
        self.timesteps = to_device(self.timesteps, device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep visited after `timestep`: the next entry of `self.timesteps` (-1 after the last).

        Before `set_timesteps()` the chain is the full training one, t -> t - 1. The schedule is read from its host
        copy (`host_schedule`): no read of the GPU, which a CUDA graph of the loop could not hold.
        """
        t = self._host_int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        timesteps = host_schedule(self)
        if t not in timesteps:
            raise ValueError(f"timestep {t} is not one of scheduler.timesteps ({timesteps[:3]} ... {timesteps[-1]}), "
                             "so its successor is unknown: step with the timesteps set by set_timesteps()")
        i = timesteps.index(t)
        return timesteps[i + 1] if i + 1 < len(timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step x_t -> x_{t-1} ~ N(mu_tilde(x_t, x_0), sigma_t^2 I) (Ho et al., Algorithm 2, line 4).

        Noise is drawn (from `generator`, as diffusers draws it) only for t > 0.
        """
        # Notation (Ho et al., arXiv 2006.11239; here "t-1" is the *previous visited* timestep):
        #   alpha_prod_t    -> alpha_bar_t            alpha_prod_t_prev -> alpha_bar_{t-1} (1 past the end)
        #   beta_prod_t     -> 1 - alpha_bar_t        beta_prod_t_prev  -> 1 - alpha_bar_{t-1}
        #   current_alpha_t -> alpha_t = alpha_bar_t / alpha_bar_{t-1}   (one step between visited timesteps)
        #   current_beta_t  -> beta_t = 1 - alpha_t
        #   posterior_variance -> beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t  (eq. 7)
        #   pred_original_sample -> x_0 predicted;  pred_prev_sample -> mu_tilde_t (eq. 7)
        variance_type = self.config.variance_type

        # 1. previous timestep
        t = self._check_timestep(timestep)
        prev_t = self.previous_timestep(t)

        # 2. a learned-variance model outputs [prediction, variance] along channels: (B, 2C, ...) -> 2 x (B, C, ...)
        predicted_variance = None
        if variance_type in LEARNED_VARIANCE_TYPES:
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(
                    f"variance_type={variance_type!r} needs a model output with 2 x {sample.shape[1]} channels "
                    f"(prediction, then variance), got {model_output.shape[1]}"
                )
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")

        # 3. alphas and betas (0-dim float32 tensors; the products below take the sample's dtype)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 4. predicted x_0 from the model output (eq. 15 for epsilon)
        pred_original_sample, _ = pred_original_and_epsilon(model_output, sample, alpha_prod_t, self.config.prediction_type)

        # 5. clip or dynamically threshold the predicted x_0
        pred_original_sample = clip_or_threshold(pred_original_sample, self.config)

        # 6. posterior mean mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
        #                               + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t   (eq. 7)
        pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 7. add sigma_t z, z ~ N(0, I), except at the last step (Algorithm 2, line 3: z = 0 if t = 1)
        if t > 0:
            variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            posterior_variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t  # beta_tilde_t, eq. 7
            std_dev_t = self._std_dev(posterior_variance, current_beta_t, predicted_variance)
            pred_prev_sample = pred_prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return SchedulerOutput(pred_prev_sample, pred_original_sample)

    def _std_dev(self, posterior_variance, current_beta_t, predicted_variance) -> torch.Tensor:
        """sigma_t for the config's `variance_type` (Ho et al. section 3.2; Nichol & Dhariwal eq. 15).

        fixed_small: sigma^2 = beta_tilde_t (clamped at 1e-20: it is 0 at t = 0), the posterior's own variance
        fixed_large: sigma^2 = beta_t, the upper bound (Ho et al. found both give similar samples)
        *_log:       the same, computed as exp(0.5 * log sigma^2)
        learned:     the model's second half is sigma^2
        learned_range: the model's second half v interpolates the logs, eq. 15:
                     log sigma^2 = frac * log beta_t + (1 - frac) * log beta_tilde_t, frac = (v + 1) / 2
        """
        variance_type = self.config.variance_type
        beta_tilde = torch.clamp(posterior_variance, min=1e-20)
        if variance_type == "fixed_small":
            return beta_tilde**0.5
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(beta_tilde))
        if variance_type == "fixed_large":
            return current_beta_t**0.5
        if variance_type == "fixed_large_log":
            return torch.exp(0.5 * torch.log(current_beta_t))
        if variance_type == "learned":
            return predicted_variance**0.5
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            log_variance = frac * torch.log(current_beta_t) + (1 - frac) * torch.log(beta_tilde)
            return torch.exp(0.5 * log_variance)
        raise ValueError(f"variance_type={variance_type!r} is unknown; expected one of {VARIANCE_TYPES}")
