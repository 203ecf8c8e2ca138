"""DEIS: the diffusion exponential integrator sampler, multistep, orders 1 to 3.

diffusers twin: `schedulers/scheduling_deis_multistep.py` (`DEISMultistepScheduler`).
Source: Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv 2204.13902:
the exponential integrator for the probability-flow ODE in eps (section 3), and its multistep form
rhoAB-DEIS (section 4): in the variable rho = sigma_t / alpha_t the ODE is d(x / alpha) = eps d(rho), so

    x_t / alpha_t = x_s / alpha_s + integral_{rho_s}^{rho_t} eps(rho) d(rho),

and eps is extrapolated by the Lagrange polynomial through the last 1, 2 or 3 model outputs (diffusers
and DEIS' reference code place the nodes in log rho: "logrho"). Order 1 is DDIM.

Notation: alpha_t, sigma_t -> x_t = alpha_t x_0 + sigma_t eps (from `self.sigmas`, as in DPM-Solver);
rho = sigma / alpha; m0, m1, m2 -> the model's eps at s0 (newest), s1, s2.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import torch

from ..configuration import Config, register_to_config
from .schedule import check_num_inference_steps
from .scheduling_dpmsolver_multistep import (
    FLOW_MATCHING_CONFIG,
    add_vp_noise,
    check_solver_timesteps,
    solver_timesteps,
    convert_model_output,
    first_order_update,
    vp_alpha_sigma,
)
from .scheduling_unipc_multistep import solver_sigmas
from .scheduling_utils import DiscreteScheduler, SchedulerOutput, check_choice, threshold_sample, to_device
from .sigmas import SigmaSchedulerMixin

logger = logging.getLogger("pare")

ALGORITHM_TYPES = ("deis",)
SOLVER_TYPES = ("logrho",)
SOLVER_ORDERS = (1, 2, 3)
# Values that DPM-Solver / UniPC configs carry in the same keys; diffusers reads them as DEIS' own.
FOREIGN_VALUES = {
    "algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},
    "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"},
}


def _log(x: torch.Tensor) -> torch.Tensor:
    """log(x) computed by numpy in float32, as diffusers' DEIS computes it (`np.log` of a tensor).

    torch.log can differ in the last bit, and the coefficients below subtract nearly equal terms (ill-conditioned
    in float32): one ulp there grows to a relative difference of 1e-4 .. 1e-3 after 50 third-order steps.
    """
    return torch.tensor(np.log(x.cpu().numpy()), dtype=x.dtype)


def deis_second_order_coefficients(rho_t, rho_s0, rho_s1):
    """C_0, C_1 = integral_{rho_s0}^{rho_t} l_j(log rho) d(rho) for the Lagrange basis on nodes log rho_s0, log rho_s1."""

    def ind_fn(t, b, c):  # an antiderivative of (log t - log c) / (log b - log c)
        return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))

    coef1 = ind_fn(rho_t, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s0, rho_s1)
    coef2 = ind_fn(rho_t, rho_s1, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s0)
    return coef1, coef2


def deis_third_order_coefficients(rho_t, rho_s0, rho_s1, rho_s2):
    """C_0, C_1, C_2 as above, for the quadratic Lagrange basis on nodes log rho_s0, log rho_s1, log rho_s2."""

    def ind_fn(t, b, c, d):  # an antiderivative of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d))
        log_t, log_c, log_d = _log(t), _log(c), _log(d)
        numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
        denominator = (_log(b) - log_c) * (_log(b) - log_d)
        return numerator / denominator

    coef1 = ind_fn(rho_t, rho_s0, rho_s1, rho_s2) - ind_fn(rho_s0, rho_s0, rho_s1, rho_s2)
    coef2 = ind_fn(rho_t, rho_s1, rho_s2, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s2, rho_s0)
    coef3 = ind_fn(rho_t, rho_s2, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s2, rho_s0, rho_s1)
    return coef1, coef2, coef3


class DEISMultistepScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Multistep DEIS (Zhang & Chen, arXiv 2204.13902, rhoAB-DEIS with log-rho Lagrange nodes), orders 1-3.

    diffusers twin: `schedulers/scheduling_deis_multistep.py DEISMultistepScheduler`; same config keys, defaults,
    state (`model_outputs`, `lower_order_nums`) and numbers (verified by `parity_tests/test_scheduling_deis_multistep.py`).

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear", "squaredcos_cap_v2"),
            trained_betas: the training noise schedule.
        solver_order (1, 2, 3), algorithm_type ("deis"), solver_type ("logrho"), lower_order_final (orders 1 and 2
            at the last two steps when there are fewer than 15).
        use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, timestep_spacing, steps_offset: the timesteps.
            Sampling ends at the smallest level, never at sigma = 0 (DEIS steps in eps, which needs sigma > 0).
        prediction_type ("epsilon", "sample", "v_prediction"), thresholding, dynamic_thresholding_ratio, sample_max_value.
    A DPM-Solver / UniPC config loads as diffusers loads it: algorithm_type "dpmsolver" / "dpmsolver++" reads as
    "deis" and solver_type "midpoint" / "heun" / "bh1" / "bh2" as "logrho" (with a log line). The flow-matching
    keys (use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type) are `unsupported_config`.

    Kept from diffusers: the model's eps is always re-derived from its x_0 (eps -> x_0 -> eps, which rounds);
    exponential / beta sigmas can start with a repeated timestep, so that the first step starts at the second
    (`index_for_timestep`'s img2img rule) and the loop runs out one step early unless `set_begin_index(0)` is called.

    Where pare differs from diffusers on purpose (each raises a ValueError where diffusers goes on):
    num_inference_steps < 1; unknown config values, including solver_order 4+ (diffusers runs it as order 3)
    and prediction_type "flow_prediction"; "leading" spacing past T-1; spacings that repeat a timestep; a timestep
    not in the schedule (diffusers silently takes the last step); a step after the last one; `mu` (flow matching).
    "trailing" spacing never gains diffusers' spurious timestep -1 (see `scheduling_dpmsolver_multistep.solver_timesteps`).
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    unsupported_config = FLOW_MATCHING_CONFIG

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        owner, c = type(self).__name__, self.config
        changed = {key: FOREIGN_VALUES[key][c[key]] for key in FOREIGN_VALUES if c[key] in FOREIGN_VALUES[key]}
        if changed:
            logger.warning("%s: reading %s as %s (values of another scheduler's config), as diffusers does",
                           owner, {k: c[k] for k in changed}, changed)
            object.__setattr__(self, "_pare_config", Config({**c, **changed}))
            c = self.config
        check_choice(owner, "algorithm_type", c.algorithm_type, ALGORITHM_TYPES)
        check_choice(owner, "solver_type", c.solver_type, SOLVER_TYPES)
        if isinstance(solver_order, bool) or not isinstance(solver_order, numbers.Integral):
            raise ValueError(f"{owner}: solver_order must be an int, got {solver_order!r}")
        check_choice(owner, "solver_order", solver_order, SOLVER_ORDERS)
        if c.thresholding and not 0 <= c.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"{owner}: dynamic_thresholding_ratio must lie in [0, 1], got {c.dynamic_thresholding_ratio!r}")
        self._build_betas()  # betas, alphas, alphas_cumprod; checks beta_schedule, prediction_type, the sigma options
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        # Before set_timesteps: every training timestep, as float32 (diffusers' placeholder).
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, mu: float | None = None) -> None:
        """Choose the timesteps (`self.timesteps`, int64) and their noise levels (`self.sigmas`, float32, one more: the end)."""
        owner, c = type(self).__name__, self.config
        if mu is not None:
            raise ValueError(f"{owner}.set_timesteps: mu={mu} shifts flow-matching schedules (use_dynamic_shifting), which pare does not implement")
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        timesteps = solver_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        check_solver_timesteps(timesteps, c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        sigmas, timesteps = solver_sigmas(self, timesteps, n, "sigma_min")  # DEIS ends at the smallest level
        self.sigmas = torch.from_numpy(sigmas)  # (n + 1,), CPU
        self.timesteps = to_device(torch.from_numpy(np.asarray(timesteps)), device, torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model's eps at the current step, by way of its x_0 (thresholded if the config says so), as diffusers does."""
        c = self.config
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self.step_index])
        threshold = None
        if c.thresholding:
            def threshold(x0):
                return threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        x0_pred = convert_model_output(model_output, sample, alpha_t, sigma_t, c.prediction_type, True, threshold)
        return (sample - alpha_t * x0_pred) / sigma_t

    def _rho_alpha(self, index: int):
        alpha, sigma = vp_alpha_sigma(self.sigmas[index])
        return sigma / alpha, alpha

    def order_of_step(self, i: int, n: int) -> int:
        """The order of step i of n, given the steps taken so far (`lower_order_nums`): the lowest of solver_order;
        one more than the steps taken; and, with lower_order_final and fewer than 15 steps, 1 at the last step and
        2 at the one before. `step` and the fast path's fused loop both ask it."""
        c = self.config
        if c.solver_order == 1 or self.lower_order_nums < 1 or (i == n - 1 and c.lower_order_final and n < 15):
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and c.lower_order_final and n < 15):
            return 2
        return 3

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep DEIS step from sigmas[i] to sigmas[i + 1], i = `step_index`, of the order `order_of_step` gives."""
        c = self.config
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        i, n = self._start_step(timestep)
        order = self.order_of_step(i, n)  # 1. the order of this step

        # 2. the model's eps, added to the history (newest last)
        model_output = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        m = self.model_outputs

        # 3. x_t = alpha_t (x_s / alpha_s0 + sum_j C_j eps_j), C_j = integral_{rho_s0}^{rho_t} l_j d(rho)
        if order == 1:
            # order 1: eps constant over the step, x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps (DDIM)
            (alpha_t, sigma_t), (alpha_s, sigma_s) = vp_alpha_sigma(self.sigmas[i + 1]), vp_alpha_sigma(self.sigmas[i])
            prev_sample = first_order_update("dpmsolver", sample, m[-1], alpha_t, sigma_t, alpha_s, sigma_s)
        elif order == 2:
            (rho_t, alpha_t), (rho_s0, alpha_s0), (rho_s1, _) = (self._rho_alpha(j) for j in (i + 1, i, i - 1))
            coef1, coef2 = deis_second_order_coefficients(rho_t, rho_s0, rho_s1)
            prev_sample = alpha_t * (sample / alpha_s0 + coef1 * m[-1] + coef2 * m[-2])
        else:
            (rho_t, alpha_t), (rho_s0, alpha_s0), (rho_s1, _), (rho_s2, _) = (self._rho_alpha(j) for j in (i + 1, i, i - 1, i - 2))
            coef1, coef2, coef3 = deis_third_order_coefficients(rho_t, rho_s0, rho_s1, rho_s2)
            prev_sample = alpha_t * (sample / alpha_s0 + coef1 * m[-1] + coef2 * m[-2] + coef3 * m[-3])
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: the model takes x_t as it is (diffusers' signature: the timestep is accepted and unused)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at the noise level of each timestep's place in the schedule (img2img)."""
        return add_vp_noise(self, original_samples, noise, timesteps)
