"""KDPM2 ancestral: k-diffusion's "DPM-Solver-2 ancestral", the midpoint step to sigma_down plus fresh noise.

diffusers twin: `schedulers/scheduling_k_dpm_2_ancestral_discrete.py` (`KDPM2AncestralDiscreteScheduler`).
Source: k-diffusion's `sample_dpm_2_ancestral` and `get_ancestral_step` (k_diffusion/sampling.py);
the midpoint method of DPM-Solver-2 (Lu et al., arXiv 2206.00927, Algorithm 4, r = 1/2) in sigma
space, with the ancestral noise split of DDPM (Ho et al., arXiv 2006.11239, Algorithm 2).
"""

from __future__ import annotations

import torch

from .schedule import check_num_inference_steps
from .scheduling_euler_ancestral_discrete import get_ancestral_step
from .scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler, repeat_inner
from .scheduling_utils import Generator, SchedulerOutput, randn_tensor


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`): midpoint between sigma_i and sigma_down, then noise sigma_up.

    diffusers twin: `schedulers/scheduling_k_dpm_2_ancestral_discrete.py KDPM2AncestralDiscreteScheduler`;
    the same config keys and defaults as KDPM2DiscreteScheduler, and diffusers' numbers (verified by
    `parity_tests/test_scheduling_k_dpm_2_ancestral_discrete.py`). pare writes it as a subclass of
    KDPM2DiscreteScheduler: only the levels and the second half of the step differ.

    Each level i splits sigma_{i+1}^2 into sigma_down^2 + sigma_up^2 (k-diffusion's get_ancestral_step);
    the midpoint is the geometric mean of sigma_i and sigma_down; the second half lands on sigma_down
    and adds noise of std sigma_up, drawn from `generator` in model_output's dtype as diffusers draws it.
    The loop sees 2n - 1 timesteps, as in KDPM2.

    Where pare differs from diffusers on purpose: as KDPM2DiscreteScheduler; and where diffusers' sigma_down
    rounds to 0 (catastrophic cancellation with a very large sigma_max, e.g. the cosine schedule's), its log-midpoint is NaN;
    pare uses the exact sigma_{i+1}^2 / sigma_i (`get_ancestral_step`), so the midpoint timestep and the samples stay finite.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, num_train_timesteps: int | None = None) -> None:
        """`num_inference_steps` levels, their ancestral split, the midpoints, and the interleaved 2n - 1 timesteps."""
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        sigmas, timesteps = self._spaced_sigmas(num_inference_steps, device, num_train_timesteps)

        # 1. sigma_up, sigma_down of each level (get_ancestral_step with eta = 1; the last level has none: 0/0)
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        sigmas_down, sigmas_up = get_ancestral_step(sigmas, sigmas_next)  # exact where diffusers' sigma_down rounds to 0
        sigmas_down[-1] = 0.0

        # 2. the midpoints exp((log sigma_i + log sigma_down_i) / 2); the last two levels step straight to 0
        sigmas_interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
        sigmas_interpol[-2:] = 0.0

        # 3. the layout the loop walks
        self.sigmas = repeat_inner(sigmas)
        self.sigmas_interpol = repeat_inner(sigmas_interpol)
        self.sigmas_up = repeat_inner(sigmas_up)
        self.sigmas_down = repeat_inner(sigmas_down)

        # 4. timesteps: [t_0, t_mid_0, t_1, t_mid_1, t_2, ...]: here the midpoint of level i comes before t_{i+1}
        t_mid = self._midpoint_timesteps(sigmas_interpol, timesteps.dtype, device)
        interleaved = torch.stack((t_mid[:-2, None], timesteps[1:, None]), dim=-1).flatten()  # (n-1, 1, 2) -> (2n-2,)
        self.timesteps = torch.cat([timesteps[:1], interleaved])

        self.sample = None
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")  # read step by step on the host: no device syncs

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1), at sigma_i for the first half and at the midpoint for the second."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index - 1]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Half of an ancestral DPM-Solver-2 step (k-diffusion `sample_dpm_2_ancestral`). Arithmetic in the inputs' dtype."""
        # Notation (sample_dpm_2_ancestral):  sigma -> sigmas[i]   sigma_interpol -> sigma_mid
        #   sigma_down, sigma_up -> get_ancestral_step(sigmas[i], sigmas[i + 1])   pred_original_sample -> denoised
        self._check_step_input(model_output, timestep, sample)
        if self.step_index is None:
            self._init_step_index(timestep)

        # 1. this level's sigmas (in the first half, sigma_down[step_index - 1] is diffusers' unused read; kept as is)
        if self.state_in_first_order:
            sigma = self.sigmas[self.step_index]
            sigma_interpol = self.sigmas_interpol[self.step_index]
            sigma_up = self.sigmas_up[self.step_index]
            sigma_down = self.sigmas_down[self.step_index - 1]
        else:
            sigma = self.sigmas[self.step_index - 1]
            sigma_interpol = self.sigmas_interpol[self.step_index - 1]
            sigma_up = self.sigmas_up[self.step_index - 1]
            sigma_down = self.sigmas_down[self.step_index - 1]
        sigma_hat = sigma  # no churn (gamma = 0)

        # 2. denoised at the level the model just saw
        sigma_input = sigma_hat if self.state_in_first_order else sigma_interpol
        pred_original_sample = self._denoised(model_output, sample, sigma_input, self.config.prediction_type)

        if self.state_in_first_order:
            # 3a. d = (x - denoised) / sigma_i; x_mid = x + (sigma_mid - sigma_i) d
            derivative = (sample - pred_original_sample) / sigma_hat
            dt = sigma_interpol - sigma_hat
            self.sample = sample
            self.dt = dt
            prev_sample = sample + derivative * dt
        else:
            # 3b. d_2 = (x_mid - denoised_2) / sigma_mid; x = x_i + (sigma_down - sigma_i) d_2; then + sigma_up z
            derivative = (sample - pred_original_sample) / sigma_interpol
            dt = sigma_down - sigma_hat
            sample = self.sample
            self.sample = None
            prev_sample = sample + derivative * dt
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
