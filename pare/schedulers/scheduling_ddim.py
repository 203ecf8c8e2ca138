"""DDIM: deterministic (eta = 0) or partly stochastic sampling over a subsequence of the training timesteps.

diffusers twin: `schedulers/scheduling_ddim.py` (`DDIMScheduler`).
Source: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502,
eq. 12 (the generative step) and eq. 16 (sigma_t(eta)).
"""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .schedule import spaced_timesteps
from .scheduling_utils import (
    DiscreteScheduler,
    Generator,
    SchedulerOutput,
    clip_or_threshold,
    pred_original_and_epsilon,
    randn_tensor,
    to_device,
)


class DDIMScheduler(DiscreteScheduler):
    """DDIM sampling, Song et al. (arXiv 2010.02502), eq. 12 with sigma_t from eq. 16.

    diffusers twin: `schedulers/scheduling_ddim.py DDIMScheduler`; same config keys, defaults,
    and numbers (verified by `parity_tests/test_scheduling_ddim.py`).

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
        "squaredcos_cap_v2"), trained_betas: the beta schedule (`schedule.make_betas`).
        rescale_betas_zero_snr: Lin et al., arXiv 2305.08891, Algorithm 1.
        clip_sample, clip_sample_range / thresholding, dynamic_thresholding_ratio, sample_max_value:
            what to do to the predicted x_0 (clamp, or Imagen's dynamic thresholding).
        set_alpha_to_one: alpha_bar "after" the last step is 1 (True) or alpha_bar_0 (False, SD's configs).
        steps_offset, timestep_spacing: which timesteps sampling visits (`schedule.spaced_timesteps`).
        prediction_type: "epsilon", "sample" or "v_prediction".

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on):
    num_inference_steps of 0 or below; "leading" timesteps past T-1; eta < 0; epsilon-prediction
    at zero SNR; unknown config values (diffusers raises only for beta_schedule). "trailing"
    spacing never gains diffusers' spurious extra timestep -1 (see `spaced_timesteps`). And at zero
    SNR with eta = 1, where diffusers can return NaN (its issue #5969), pare clamps a rounding
    error (step 7 of `step`).
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._build_schedule()
        # alpha_bar of the step after the last one: 1 means "fully denoised" (DDIM paper, alpha_0 := 1).
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the `num_inference_steps` timesteps to sample with (`self.timesteps`, int64, descending)."""
        c = self.config
        self.timesteps = spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        self.timesteps = to_device(self.timesteps, device)
        self.num_inference_steps = int(num_inference_steps)

    def previous_timestep(self, timestep: int) -> int:
        """t - T // n: the stride of "leading" spacing, used by diffusers' DDIM for every spacing.

        For "trailing" and "linspace" the true next timestep can differ from this by a few
        (diffusers issue #12633); pare keeps diffusers' stride so that both give the same numbers.
        A negative result means "past the last step": alpha_bar is then `final_alpha_cumprod`.
        """
        return self._host_int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t-1} (Song et al., arXiv 2010.02502, eq. 12).

        eta = 0 is DDIM proper (deterministic); eta = 1 gives DDPM's posterior variance. For eta > 0 the
        noise is `variance_noise` if given, else drawn from `generator` as diffusers draws it.
        `use_clipped_model_output` re-derives eps from the clipped x_0 before forming the direction.
        """
        # Notation (diffusers' names -> the DDIM paper, which writes alpha_t for DDPM's alpha_bar_t):
        #   alpha_prod_t          -> alpha_t                   alpha_prod_t_prev -> alpha_{t-1}
        #   beta_prod_t           -> 1 - alpha_t               std_dev_t         -> sigma_t(eta), eq. 16
        #   pred_original_sample  -> "predicted x_0"           pred_epsilon      -> eps_theta(x_t)
        #   pred_sample_direction -> "direction pointing to x_t"
        if self.num_inference_steps is None:
            raise ValueError(
                "DDIMScheduler.step() was called before set_timesteps(): call "
                "scheduler.set_timesteps(num_inference_steps) first, it fixes the step size"
            )
        if eta < 0:
            raise ValueError(f"eta={eta} is negative: it scales a standard deviation and must be >= 0 (0: DDIM, 1: DDPM)")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")

        # 1. previous timestep (= t - T // n)
        t = self._check_timestep(timestep)
        prev_t = self.previous_timestep(t)

        # 2. alphas and betas (0-dim float32 tensors; the products below take the sample's dtype)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # 3. predicted x_0 and eps from the model output ("predicted x_0" of eq. 12)
        pred_original_sample, pred_epsilon = pred_original_and_epsilon(
            model_output, sample, alpha_prod_t, self.config.prediction_type
        )

        # 4. clip or dynamically threshold the predicted x_0
        pred_original_sample = clip_or_threshold(pred_original_sample, self.config)

        # 5. sigma_t(eta) = eta * sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_{t-1})  (eq. 16)
        variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** (0.5)

        # 6. optionally, eps consistent with the clipped x_0 (as in Glide)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)

        # 7. "direction pointing to x_t": sqrt(1 - alpha_{t-1} - sigma_t^2) * eps  (eq. 12)
        # The clamp: 1 - alpha_{t-1} - sigma_t^2 >= 0 exactly for eta <= 1, but at zero SNR (alpha_t = 0) with
        # eta = 1 it *is* 0 and rounding can make it -1e-8, whose square root is NaN (diffusers issue #5969).
        direction_variance = torch.clamp(1 - alpha_prod_t_prev - std_dev_t**2, min=0)
        pred_sample_direction = direction_variance ** (0.5) * pred_epsilon

        # 8. x_{t-1} = sqrt(alpha_{t-1}) * x_0 + direction + sigma_t * z  (eq. 12)
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to step(), not both: each is a source of the noise")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
