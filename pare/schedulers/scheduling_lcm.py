"""LCM: multistep consistency sampling for latent consistency models (LCM, LCM-LoRA, SDXL-LCM).

diffusers twin: `schedulers/scheduling_lcm.py` (`LCMScheduler`).
Source: Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models", arXiv 2310.04378:
the consistency function f(x, t) = c_skip(t) x + c_out(t) x_0(x, t) with its boundary condition
(section 3, after Song et al.'s consistency models, arXiv 2303.01469), the skipping-step schedule
(section 4.2, "k") and multistep sampling (Algorithm 1, "Multistep Latent Consistency Sampling"):
denoise to x_0, then re-noise to the next timestep with fresh noise.
"""

from __future__ import annotations

import logging
import numbers
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from .schedule import check_custom_timesteps, check_num_inference_steps
from .scheduling_utils import (
    DiscreteScheduler,
    Generator,
    clip_or_threshold,
    host_schedule,
    pred_original_and_epsilon,
    randn_tensor,
    to_device,
)
from .sigmas import SigmaSchedulerMixin

logger = logging.getLogger("pare")


class LCMSchedulerOutput(NamedTuple):
    """What `LCMScheduler.step` returns. diffusers twin: `LCMSchedulerOutput`."""

    prev_sample: torch.Tensor  # the next loop input: `denoised` re-noised to the next timestep (or `denoised` at the end)
    denoised: torch.Tensor  # f(x_t, t): the consistency model's x_0, what LCM pipelines decode after the last step


class LCMScheduler(DiscreteScheduler, SigmaSchedulerMixin):
    """Multistep latent consistency sampling, Luo et al. (arXiv 2310.04378).

    diffusers twin: `schedulers/scheduling_lcm.py LCMScheduler`; same config keys, defaults,
    timesteps, noise draws and numbers (verified by `parity_tests/test_scheduling_lcm.py`).
    Only `step_index` bookkeeping comes from `sigmas.SigmaSchedulerMixin` (LCM walks the DDPM
    chain: `add_noise` is the DDPM one).

    Config (diffusers' names and defaults; the betas are Stable Diffusion's):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
        "squaredcos_cap_v2"), trained_betas, rescale_betas_zero_snr: the beta schedule.
        original_inference_steps: N of the distillation schedule; its timesteps are
            k - 1, 2k - 1, ..., N k - 1 with the skipping step k = T // N (section 4.2).
        clip_sample, clip_sample_range / thresholding, dynamic_thresholding_ratio, sample_max_value:
            what to do to the predicted x_0.
        set_alpha_to_one: alpha_bar past the last step (only reached with custom timesteps ending at 0).
        prediction_type: "epsilon", "sample" or "v_prediction".
        timestep_scaling: t is multiplied by it in c_skip / c_out (10 in LCM's training).
        timestep_spacing, steps_offset: accepted and, as in diffusers, unused (the LCM schedule is its own).

    Kept from diffusers for parity: with custom `timesteps` and strength < 1 the schedule is cut
    but `num_inference_steps` keeps the full count, so the last step still adds noise: its
    `prev_sample` is `denoised` re-noised to the last timestep. LCM pipelines decode `denoised`,
    which is unaffected.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on or
    fails obscurely): num_inference_steps or original_inference_steps that are not positive ints;
    strength outside (0, 1]; custom timesteps that are empty, negative (diffusers would index
    alphas_cumprod from the end), or cut to nothing by strength; a timestep not in the schedule;
    epsilon-prediction at zero SNR (diffusers returns inf); unknown config values.
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    sigma_data = 0.5  # the data standard deviation of c_skip / c_out (consistency models, section 3.3)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._build_schedule()
        self._check_original_steps(original_inference_steps, "the config's original_inference_steps")
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    def _check_original_steps(self, original_steps, source: str) -> int:
        T = self.config.num_train_timesteps
        if isinstance(original_steps, bool) or not isinstance(original_steps, numbers.Integral) or original_steps < 1:
            raise ValueError(f"LCMScheduler: {source} must be a positive int, got {original_steps!r}")
        if original_steps > T:
            raise ValueError(
                f"LCMScheduler: {source}={original_steps} cannot be larger than num_train_timesteps={T}: "
                "the distillation schedule is a subset of the training timesteps"
            )
        return int(original_steps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Choose the timesteps: `num_inference_steps` evenly spaced (by index) over the distillation schedule,
        or your own `timesteps`; `strength` < 1 keeps only its low-noise part (img2img)."""
        T = self.config.num_train_timesteps
        # 0. exactly one of num_inference_steps and timesteps
        if num_inference_steps is None and timesteps is None:
            raise ValueError("LCMScheduler.set_timesteps() needs one of num_inference_steps and timesteps")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("LCMScheduler.set_timesteps() takes only one of num_inference_steps and timesteps")
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must lie in (0, 1]: the fraction of the schedule to run (1: all of it)")

        # 1. the distillation schedule: t_i = i k - 1 for i = 1 .. N * strength, k = T // N (section 4.2)
        original_steps = self._check_original_steps(
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps,
            "original_inference_steps",
        )
        k = T // original_steps
        lcm_origin_timesteps = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

        if timesteps is not None:
            # 2a. custom timesteps, cut by strength as StableDiffusionImg2ImgPipeline.get_timesteps cuts
            checked = check_custom_timesteps(timesteps, T).numpy()
            on_schedule = set(lcm_origin_timesteps.tolist())
            off_schedule = [int(t) for t in checked[1:] if int(t) not in on_schedule]  # diffusers checks from the 2nd
            if strength == 1.0 and checked[0] != T - 1:
                logger.warning(
                    "LCMScheduler: the custom timesteps start at %d, not at num_train_timesteps - 1 = %d: "
                    "you may get unexpected results", checked[0], T - 1)
            if off_schedule:
                logger.warning(
                    "LCMScheduler: the custom timesteps %s are not on the distillation schedule (t = i * %d - 1): "
                    "you may get unexpected results", off_schedule, k)
            if len(checked) > original_steps:
                logger.warning(
                    "LCMScheduler: %d custom timesteps are more than original_inference_steps=%d: "
                    "you may get unexpected results", len(checked), original_steps)
            self.num_inference_steps = len(checked)
            self.custom_timesteps = True
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            t_start = max(self.num_inference_steps - init_timestep, 0)
            chosen = checked[t_start * self.order:]
            if len(chosen) == 0:
                raise ValueError(
                    f"strength={strength} keeps none of the {len(checked)} custom timesteps: "
                    f"int({len(checked)} * strength) must be at least 1"
                )
        else:
            # 2b. num_inference_steps of them, evenly spaced by index, starting at the noisiest
            n = check_num_inference_steps(num_inference_steps, T)
            skipping_step = len(lcm_origin_timesteps) // n
            if skipping_step < 1:
                raise ValueError(
                    f"original_inference_steps x strength = {original_steps} x {strength} gives "
                    f"{len(lcm_origin_timesteps)} timesteps, fewer than num_inference_steps={n}: use at most "
                    f"{int(original_steps * strength)} steps, or a strength of at least {n / original_steps}"
                )
            if n > original_steps:
                raise ValueError(
                    f"num_inference_steps={n} cannot be larger than original_inference_steps={original_steps}: "
                    "the schedule is a subset of the distillation schedule"
                )
            self.num_inference_steps = n
            self.custom_timesteps = False
            descending = lcm_origin_timesteps[::-1].copy()
            inference_indices = np.floor(np.linspace(0, len(descending), num=n, endpoint=False)).astype(np.int64)
            chosen = descending[inference_indices]

        self.timesteps = to_device(torch.from_numpy(chosen), device, torch.long)
        self._step_index = None
        self._begin_index = None

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple:
        """(c_skip, c_out) at `timestep` (Luo et al., section 3; consistency models, arXiv 2303.01469):

            c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

        with s = `timestep_scaling`, so that c_skip ~ 1 and c_out ~ 0 near t = 0: f(x, 0) = x, the boundary
        condition. An int timestep gives Python floats, a tensor one tensors (float32), as in diffusers.
        """
        scaled_timestep = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled_timestep**2 + self.sigma_data**2)
        c_out = scaled_timestep / (scaled_timestep**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """One multistep consistency step: x_0 = f(x_t, t), then x_{t'} = sqrt(alpha_bar_t') x_0 + sqrt(1 - alpha_bar_t') z.

        z ~ N(0, I) is drawn from `generator` as diffusers draws it, at every step but the last.
        """
        # Notation (Luo et al.): alpha_prod_t -> alpha_bar_t (the paper's alpha(t)^2); prev_timestep -> t', the next
        # timestep of the schedule; predicted_original_sample -> x_0 from the model's parameterisation (eps, x_0 or v:
        # section 4.1); denoised -> f_theta(x_t, t) = c_skip x_t + c_out x_0 (section 3)
        if self.num_inference_steps is None:
            raise ValueError(
                "LCMScheduler.step() was called before set_timesteps(): call "
                "scheduler.set_timesteps(num_inference_steps) first"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        if self.step_index is None:
            self._init_step_index(timestep)
        t = self._check_timestep(timestep)

        # 1. the next timestep t' (the last step stays at t)
        prev_step_index = self.step_index + 1
        prev_t = int(host_schedule(self)[prev_step_index]) if prev_step_index < len(self.timesteps) else t  # no GPU read

        # 2. alphas and betas (0-dim float32 tensors)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        # 3. the boundary-condition scalings c_skip(t), c_out(t) (section 3)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)

        # 4. x_0 from the model output (epsilon: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t))
        predicted_original_sample, _ = pred_original_and_epsilon(
            model_output, sample, alpha_prod_t, self.config.prediction_type
        )

        # 5. clip or dynamically threshold x_0
        predicted_original_sample = clip_or_threshold(predicted_original_sample, self.config)

        # 6. the consistency function f(x_t, t) = c_skip x_t + c_out x_0 (section 3; Algorithm 1)
        denoised = c_out * predicted_original_sample + c_skip * sample

        # 7. re-noise to t' for the next step; none after the last step (and so none in one-step sampling)
        if self.step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample, denoised)

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The timestep after `timestep` in the schedule (-1 after the last); t - 1 before set_timesteps()."""
        if self.custom_timesteps or self.num_inference_steps:
            index = self.index_for_timestep(timestep)
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1
