"""DPM-Solver and DPM-Solver++ (singlestep): each k-th order step spends k model evaluations on one interval.

diffusers twin: `schedulers/scheduling_dpmsolver_singlestep.py` (`DPMSolverSinglestepScheduler`).
Sources: Lu et al., arXiv 2206.00927 (DPM-Solver-2 / -3: Algorithms 1 and 2) and arXiv 2211.01095
(DPM-Solver++(2S): Algorithm 1). "DPM++ 2S" of the web UIs is algorithm_type="dpmsolver++", solver_order=2.

How diffusers lays a singlestep solver onto a pipeline's one-model-call-per-step loop: `get_order_list` splits
the timesteps into groups [1, 2] (order 2) or [1, 2, 3] (order 3). The first step of a group is a first-order
step from its start x_s to the next level; each later step of the group restarts from x_s (`self.sample`) and
reaches one level further, using every model output of the group. The notation is that of
`scheduling_dpmsolver_multistep.py`, whose functions this file reuses.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import Config, register_to_config
from .schedule import check_custom_timesteps, check_num_inference_steps
from .scheduling_dpmsolver_multistep import (
    DATA_PREDICTION_TYPES,
    FLOW_MATCHING_CONFIG,
    LEARNED_VARIANCE_TYPES,
    VARIANCE_TYPES,
    add_vp_noise,
    check_solver_timesteps,
    last_unclipped_timestep,
    solver_timesteps,
    check_solver_config,
    convert_model_output,
    degenerate_step,
    first_order_update,
    log_snr,
    ode_type,
    resolve_foreign_values,
    second_order_update,
    vp_alpha_sigma,
)
from .scheduling_utils import DiscreteScheduler, Generator, SchedulerOutput, check_choice, randn_tensor, threshold_sample, to_device
from .sigmas import SigmaSchedulerMixin, convert_sigmas, timesteps_for_sigmas, train_sigmas

logger = logging.getLogger("pare")

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")


def singlestep_second_order_update(algorithm_type, solver_type, sample, m, alphas, sigmas, noise=None) -> torch.Tensor:
    """x_t from x_s1 with the outputs at s1 and s0 (DPM-Solver++(2S), arXiv 2211.01095, Algorithm 1; DPM-Solver-2).

    m = [..., m1, m0] (m1 at the group's start s1, m0 at the intermediate s0); alphas / sigmas = (t, s0, s1).
    """
    (alpha_t, alpha_s0, alpha_s1), (sigma_t, sigma_s0, sigma_s1) = alphas, sigmas
    lambda_t, lambda_s0, lambda_s1 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0), log_snr(alpha_s1, sigma_s1)
    m0, m1 = m[-1], m[-2]
    # 1. the whole interval h = lambda_t - lambda_s1; the intermediate point at r0 = h_0 / h of it
    h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
    r0 = h_0 / h
    # 2. D1 ~ h * dm/dlambda at s1: the forward difference to the intermediate point
    D0, D1 = m1, (1.0 / r0) * (m0 - m1)
    # 3. integrate from s1
    return second_order_update(algorithm_type, solver_type, sample, h, D0, D1, alpha_t, sigma_t, alpha_s1, sigma_s1, noise)


def singlestep_third_order_update(algorithm_type, solver_type, sample, m, alphas, sigmas, noise=None) -> torch.Tensor:
    """x_t from x_s2 with the outputs at s2, s1, s0 (DPM-Solver-3, arXiv 2206.00927, Algorithm 2, and its ++ / SDE forms).

    "midpoint" is Algorithm 2 (only the difference to the second intermediate point, D1_1); "heun" fits a
    quadratic through all three (D1, D2). alphas / sigmas = (t, s0, s1, s2).
    """
    (alpha_t, alpha_s0, alpha_s1, alpha_s2), (sigma_t, sigma_s0, sigma_s1, sigma_s2) = alphas, sigmas
    lambda_t, lambda_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
    lambda_s1, lambda_s2 = log_snr(alpha_s1, sigma_s1), log_snr(alpha_s2, sigma_s2)
    m0, m1, m2 = m[-1], m[-2], m[-3]
    # 1. the whole interval from s2, and the two intermediate points at r1 < r0 of it
    h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    # 2. forward differences to each intermediate point; D1, D2 of the quadratic through the three
    D0 = m2
    D1_0, D1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
    D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    # 3. integrate from s2 (the operations in diffusers' order)
    if algorithm_type == "dpmsolver++":
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s2) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1_1
            )
        return (
            (sigma_t / sigma_s2) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "dpmsolver":
        if solver_type == "midpoint":
            return (
                (alpha_t / alpha_s2) * sample
                - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1_1
            )
        return (
            (alpha_t / alpha_s2) * sample
            - (sigma_t * (torch.exp(h) - 1.0)) * D0
            - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "sde-dpmsolver++":
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s2 * torch.exp(-h)) * sample
                + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
                + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1_1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (
            (sigma_t / sigma_s2 * torch.exp(-h)) * sample
            + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)) * D2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    raise ValueError(f"algorithm_type={algorithm_type!r}; expected one of {ALGORITHM_TYPES}")


class DPMSolverSinglestepScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Singlestep DPM-Solver (arXiv 2206.00927, Algorithms 1-2) and DPM-Solver++(2S) (arXiv 2211.01095, Algorithm 1).

    diffusers twin: `schedulers/scheduling_dpmsolver_singlestep.py DPMSolverSinglestepScheduler`; same config keys,
    defaults and numbers (verified by `parity_tests/test_scheduling_dpmsolver_singlestep.py`).

    Config (diffusers' names and defaults): as `DPMSolverMultistepScheduler`, without timestep_spacing (always
    "linspace"), steps_offset, rescale_betas_zero_snr, euler_at_final and use_lu_lambdas, and with
    algorithm_type in ("dpmsolver", "dpmsolver++", "sde-dpmsolver++") and lower_order_final=False by default.
    Flow-matching keys are `unsupported_config`.

    As in diffusers, `set_timesteps` turns lower_order_final on, in the config and for good (with a warning), when
    final_sigmas_type="zero" (sigma = 0 allows only a first-order last step) or when num_inference_steps is not a
    multiple of solver_order.

    Where pare differs from diffusers on purpose (each has a test):
      - ValueError where diffusers goes on: as in `DPMSolverMultistepScheduler` (num_inference_steps < 1, unknown
        values, repeated timesteps, bad custom timesteps, a timestep not in the schedule, a step after the last, `mu`).
      - algorithm_type="dpmsolver" with thresholding: diffusers indexes alpha_t by a timestep of None and fails
        with a shape error; pare thresholds at the current noise level, as the multistep twin does.
      - a repeated first timestep starts at step 0, where diffusers skips a level (see the multistep twin).
      - variance_type keeps the first `sample.shape[1]` output channels (diffusers: [:3], see the multistep twin).
      - a first-order step of zero length in lambda (sigma_min repeated at the end) is an ODE step, where
        diffusers' sde-dpmsolver++ can take the square root of a rounding error below 0 (NaN): `degenerate_step`.
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    unsupported_config = FLOW_MATCHING_CONFIG
    start_at_first_timestep = True  # see SigmaSchedulerMixin._init_step_index

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
    ):
        resolve_foreign_values(self)
        check_solver_config(self, ALGORITHM_TYPES)
        check_choice(type(self).__name__, "variance_type", self.config.variance_type, VARIANCE_TYPES)
        self._build_betas()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.sample = None  # x at the start of the current group of steps
        self.order_list = self.get_order_list(num_train_timesteps)

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of each step: groups [1, 2, 3] (or [1, 2]), the tail shortened if lower_order_final.

        Without lower_order_final the list has n - n % solver_order entries (set_timesteps turns the option on
        when that differs from n). final_sigmas_type="zero" makes the last step first order.
        """
        c, steps, order = self.config, num_inference_steps, self.config.solver_order
        if c.lower_order_final:
            if order == 3:
                if steps % 3 == 0:
                    orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
                elif steps % 3 == 1:
                    orders = [1, 2, 3] * (steps // 3) + [1]
                else:
                    orders = [1, 2, 3] * (steps // 3) + [1, 2]
            elif order == 2:
                if steps % 2 == 0:
                    orders = [1, 2] * (steps // 2 - 1) + [1, 1]
                else:
                    orders = [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        else:
            orders = {1: [1], 2: [1, 2], 3: [1, 2, 3]}[order] * (steps // order)
        if c.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def _turn_on_lower_order_final(self, why: str) -> None:
        logger.warning("%s: setting lower_order_final=True in the config (as diffusers does): %s", type(self).__name__, why)
        object.__setattr__(self, "_pare_config", Config({**self.config, "lower_order_final": True}))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps (`self.timesteps`, int64), their noise levels (`self.sigmas`) and the order of each step."""
        c, owner, T = self.config, type(self).__name__, self.config.num_train_timesteps
        if mu is not None:
            raise ValueError(
                f"{owner}.set_timesteps: mu={mu} shifts flow-matching schedules (use_dynamic_shifting), "
                "which pare does not implement"
            )
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps()")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if c[flag]:
                    raise ValueError(f"custom timesteps cannot be used with {flag}=True, which chooses its own noise levels")
            timesteps = check_custom_timesteps(timesteps, T).numpy()
            num_inference_steps = len(timesteps)
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, T)
            # "linspace" over the timesteps whose lambda is above lambda_min_clipped (diffusers has no other spacing here)
            timesteps = solver_timesteps("linspace", num_inference_steps, T, last_timestep=last_unclipped_timestep(self))
            if not any(c[flag] for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
                check_solver_timesteps(timesteps, "linspace", num_inference_steps, T,
                                       context=f" (lambda_min_clipped={c.lambda_min_clipped})")
        self.num_inference_steps = num_inference_steps

        # 1. the noise levels (as in the multistep twin; Karras timesteps are always rounded here)
        sigmas = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        chosen = convert_sigmas(c, np.flip(sigmas).copy(), num_inference_steps)
        if chosen is not None:
            sigmas = chosen
            timesteps = timesteps_for_sigmas(sigmas, log_sigmas)
            if c.use_karras_sigmas:
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if c.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = to_device(torch.from_numpy(np.asarray(timesteps)), device, torch.int64)

        # 2. a fresh state, and the order of each step
        self.model_outputs = [None] * c.solver_order
        self.sample = None
        if not c.lower_order_final and num_inference_steps % c.solver_order != 0:
            self._turn_on_lower_order_final(f"num_inference_steps={num_inference_steps} is not a multiple of solver_order={c.solver_order}")
        if not self.config.lower_order_final and c.final_sigmas_type == "zero":
            self._turn_on_lower_order_final("final_sigmas_type='zero' allows only a first-order last step")
        self.order_list = self.get_order_list(num_inference_steps)
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 (DPM-Solver++) or eps (DPM-Solver) at the current noise level (see the multistep twin's function)."""
        c = self.config
        if c.variance_type in LEARNED_VARIANCE_TYPES:
            model_output = model_output[:, : sample.shape[1]]  # (B, 2C, ...) -> (B, C, ...): the mean; drop the variance
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self.step_index])
        threshold = None
        if c.thresholding:
            def threshold(x0):
                return threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return convert_model_output(model_output, sample, alpha_t, sigma_t, c.prediction_type,
                                    c.algorithm_type in DATA_PREDICTION_TYPES, threshold)

    def singlestep_dpm_solver_update(self, model_output_list, sample, order: int, noise=None) -> torch.Tensor:
        """The step of the given order that ends at sigmas[step_index + 1], from `sample` (the group's start)."""
        c, i = self.config, self.step_index
        if order == 1:
            (alpha_t, sigma_t), (alpha_s, sigma_s) = vp_alpha_sigma(self.sigmas[i + 1]), vp_alpha_sigma(self.sigmas[i])
            algorithm_type = c.algorithm_type
            if degenerate_step(algorithm_type, alpha_t, sigma_t, alpha_s, sigma_s):  # see the multistep twin
                algorithm_type, noise = ode_type(algorithm_type), None
            return first_order_update(algorithm_type, sample, model_output_list[-1], alpha_t, sigma_t, alpha_s, sigma_s, noise)
        alphas, sigmas = zip(*(vp_alpha_sigma(self.sigmas[j]) for j in range(i + 1, i - order, -1)))  # t, s0, s1[, s2]
        update = singlestep_second_order_update if order == 2 else singlestep_third_order_update
        return update(c.algorithm_type, c.solver_type, sample, model_output_list, alphas, sigmas, noise)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One step of the order `order_list[step_index]`; sde-dpmsolver++ draws its noise from `generator`
        (in the model output's dtype, as diffusers draws it) at every step."""
        c, owner = self.config, type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(
                f"{owner}.step() was called before set_timesteps(): call scheduler.set_timesteps(num_inference_steps) first"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.order_list):
            raise ValueError(f"{owner}.step(): all {len(self.order_list)} steps are done; call set_timesteps() again to sample anew")

        # 1. the model output as the solver's x_0 or eps, added to the history (newest last)
        model_output = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)

        # 2. this step's order; lower where the history is short (img2img can start mid-group)
        order = self.order_list[self.step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        # 3. a first-order step opens a group: later steps of the group restart from its x
        if order == 1:
            self.sample = sample
        prev_sample = self.singlestep_dpm_solver_update(self.model_outputs, self.sample, order, noise)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: the model takes x_t as it is (diffusers' signature: the timestep is accepted and unused)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at each timestep's place in the schedule (img2img)."""
        return add_vp_noise(self, original_samples, noise, timesteps)
