"""KDPM2: k-diffusion's "DPM-Solver-2" sampler, a midpoint method in log sigma (2nd order, deterministic).

diffusers twin: `schedulers/scheduling_k_dpm_2_discrete.py` (`KDPM2DiscreteScheduler`).
Source: k-diffusion's `sample_dpm_2` (k_diffusion/sampling.py), a variant of Karras et al.,
arXiv 2206.00364, Algorithm 2 that evaluates the model at the geometric midpoint
sigma_mid = sqrt(sigma_i sigma_{i+1}) (DPM-Solver-2's midpoint in lambda = -log sigma;
Lu et al., arXiv 2206.00927, Algorithm 4 with r = 1/2).
"""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .scheduling_utils import DiscreteScheduler, SchedulerOutput
from .schedule import check_num_inference_steps
from .sigmas import SigmaSchedulerMixin, convert_sigmas, float_spaced_timesteps, sigma_to_t, timesteps_for_sigmas, train_sigmas


def repeat_inner(x: torch.Tensor) -> torch.Tensor:
    """[x_0, x_1, x_1, ..., x_m, x_m, x_m]: every entry after the first twice, and the last once more (diffusers' layout)."""
    return torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])


class KDPM2DiscreteScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """DPM-Solver-2 in sigma space (k-diffusion `sample_dpm_2`): Euler to the log-midpoint, then a full step with its slope.

    diffusers twin: `schedulers/scheduling_k_dpm_2_discrete.py KDPM2DiscreteScheduler`; same config keys,
    defaults and numbers (verified by `parity_tests/test_scheduling_k_dpm_2_discrete.py`).

    The loop sees 2n - 1 timesteps: [t_0, t_mid_1, t_1, t_mid_2, t_2, ..., t_mid_{n-1}, t_{n-1}], where
    t_mid_i is the (fractional) training timestep of sigma_mid between levels i-1 and i. Steps at odd positions
    are the second half of the step before them; the last level goes to sigma = 0 in one Euler step
    (its midpoint would be 0). `order = 2` tells pipelines so.

    Config (diffusers' names and defaults): num_train_timesteps, beta_start (0.00085), beta_end (0.012),
    beta_schedule ("linear", "scaled_linear", "squaredcos_cap_v2"), trained_betas;
    use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one); prediction_type
    ("epsilon" or "v_prediction"); timestep_spacing, steps_offset.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on or fails
    later): prediction_type="sample" is refused when the config is read (diffusers raises
    NotImplementedError in `step`); num_inference_steps of 0 or below; unknown config values; a timestep
    not in the schedule. "trailing" spacing never gains diffusers' spurious extra timestep -1.
    `get_velocity` is not provided.
    A schedule whose first timestep repeats (e.g. Karras levels of the cosine schedule) starts at its first
    level, where diffusers skips one (`SigmaSchedulerMixin._init_step_index`).
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    integer_timesteps_allowed = True  # looked up in the float schedule, as diffusers does
    order = 2
    prediction_types = ("epsilon", "v_prediction")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
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
        """True when the next step is the first half (to the midpoint) of a level."""
        return self.sample is None

    def _spaced_sigmas(self, num_inference_steps: int, device, num_train_timesteps: int | None):
        """(sigmas with a final 0 as a float32 tensor, their timesteps as a tensor, log training sigmas as a tensor)."""
        c = self.config
        T = num_train_timesteps or c.num_train_timesteps
        timesteps = float_spaced_timesteps(c.timestep_spacing, num_inference_steps, T, c.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        respaced = convert_sigmas(c, sigmas, num_inference_steps)
        if respaced is not None:
            timesteps = timesteps_for_sigmas(respaced, log_sigmas)
            if c.use_karras_sigmas:
                timesteps = timesteps.round()  # diffusers rounds the Karras timesteps only (float64 from here on)
            sigmas = respaced
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        return sigmas, torch.from_numpy(timesteps).to(device)

    def _midpoint_timesteps(self, sigmas_mid: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """The training timestep of each midpoint level, one `sigma_to_t` call per level on torch values, as diffusers makes them."""
        log_sigmas = self.log_sigmas.cpu()
        t_mid = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas_mid.cpu()])
        return torch.from_numpy(t_mid).to(device, dtype=dtype)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, num_train_timesteps: int | None = None) -> None:
        """`num_inference_steps` levels, their log-midpoints, and the interleaved 2n - 1 timesteps."""
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        sigmas, timesteps = self._spaced_sigmas(num_inference_steps, device, num_train_timesteps)

        # 1. sigma_mid_i = exp((log sigma_i + log sigma_{i-1}) / 2), the geometric mean of a level and the one before
        #    (entry 0 pairs sigma_0 with the final 0 and is never used)
        sigmas_interpol = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()

        # 2. the layout the loop walks: [s_0, s_1, s_1, ..., 0, 0, 0] and likewise for the midpoints
        self.sigmas = repeat_inner(sigmas)
        self.sigmas_interpol = repeat_inner(sigmas_interpol)

        # 3. timesteps: [t_0, t_mid_1, t_1, ..., t_mid_{n-1}, t_{n-1}]
        t_mid = self._midpoint_timesteps(sigmas_interpol, timesteps.dtype, device)
        interleaved = torch.stack((t_mid[1:-1, None], timesteps[1:, None]), dim=-1).flatten()  # (n-1, 1, 2) -> (2n-2,)
        self.timesteps = torch.cat([timesteps[:1], interleaved])

        self.sample = None  # x_i, kept between the two halves
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")  # read step by step on the host: no device syncs

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1), at sigma_i for the first half and at the midpoint for the second."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    @staticmethod
    def _denoised(model_output, sample, sigma_input, prediction_type: str) -> torch.Tensor:
        """D(x; sigma) from the model output (EDM, arXiv 2206.00364, Table 1, VP preconditioning)."""
        if prediction_type == "epsilon":
            return sample - sigma_input * model_output
        return model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + (sample / (sigma_input**2 + 1))  # v_prediction

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Half of a DPM-Solver-2 step (k-diffusion `sample_dpm_2`). Arithmetic in the inputs' dtype, as diffusers does."""
        # Notation (sample_dpm_2):  sigma -> sigmas[i]   sigma_interpol -> sigma_mid   sigma_next -> sigmas[i + 1]
        #   pred_original_sample -> denoised   derivative -> d (first half) or d_2 (second half)
        self._check_step_input(model_output, timestep, sample)
        if self.step_index is None:
            self._init_step_index(timestep)

        # 1. the levels of this level's two halves
        if self.state_in_first_order:
            sigma = self.sigmas[self.step_index]
            sigma_interpol = self.sigmas_interpol[self.step_index + 1]
            sigma_next = self.sigmas[self.step_index + 1]
        else:
            sigma = self.sigmas[self.step_index - 1]
            sigma_interpol = self.sigmas_interpol[self.step_index]
            sigma_next = self.sigmas[self.step_index]
        sigma_hat = sigma  # no churn (gamma = 0)

        # 2. denoised at the level the model just saw: sigma_i, or the midpoint
        sigma_input = sigma_hat if self.state_in_first_order else sigma_interpol
        pred_original_sample = self._denoised(model_output, sample, sigma_input, self.config.prediction_type)

        if self.state_in_first_order:
            # 3a. d = (x - denoised) / sigma_i; x_mid = x + (sigma_mid - sigma_i) d
            derivative = (sample - pred_original_sample) / sigma_hat
            dt = sigma_interpol - sigma_hat
            self.sample = sample
        else:
            # 3b. d_2 = (x_mid - denoised_2) / sigma_mid; x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_2
            derivative = (sample - pred_original_sample) / sigma_interpol
            dt = sigma_next - sigma_hat
            sample = self.sample
            self.sample = None

        self._step_index += 1
        prev_sample = sample + derivative * dt
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
