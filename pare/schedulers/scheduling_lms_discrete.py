"""LMS: the linear multistep (Adams-Bashforth) sampler in sigma space, with integrated coefficients.

diffusers twin: `schedulers/scheduling_lms_discrete.py` (`LMSDiscreteScheduler`).
Source: k-diffusion's `sample_lms` and `linear_multistep_coeff` (k_diffusion/sampling.py), after
Karras et al., arXiv 2206.00364 (the ODE dx/dsigma = (x - D(x; sigma)) / sigma of eq. 1 with
sigma(t) = t); the multistep method is Adams-Bashforth on a non-uniform grid
(Hairer, Norsett & Wanner, "Solving ODEs I", section III.1).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from .scheduling_utils import DiscreteScheduler, SchedulerOutput, to_device
from .schedule import check_num_inference_steps
from .sigmas import SigmaSchedulerMixin, convert_sigmas, float_spaced_timesteps, timesteps_for_sigmas, train_sigmas

logger = logging.getLogger("pare")


def lms_coefficient(sigmas, order: int, t: int, current_order: int) -> float:
    """The integral over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of node sigma_{t - current_order}
    on the nodes sigma_t, sigma_{t-1}, ..., sigma_{t-order+1}:

        c_j = int_{sigma_t}^{sigma_{t+1}} prod_{k != j} (tau - sigma_{t-k}) / (sigma_{t-j} - sigma_{t-k}) d tau,  j = current_order

    The integrand is a polynomial of degree order - 1, so an `order`-point Gauss-Legendre rule (exact up to
    degree 2 order - 1) integrates it exactly, in float64 and in product form (no expansion into monomials,
    which would cancel badly for close nodes): no scipy at run time. diffusers (and k-diffusion) call
    scipy.integrate.quad on the same integrand evaluated in float32; the two agree to float32 rounding of
    the integrand (~1e-6 of the interval), and pare's value is the exact one to ~1e-15
    (parity_tests/test_scheduling_lms_discrete.py).
    """
    nodes = [float(sigmas[t - k]) for k in range(order)]
    lower, upper = float(sigmas[t]), float(sigmas[t + 1])
    x, w = np.polynomial.legendre.leggauss(order)  # on [-1, 1]
    tau = (upper + lower) / 2 + (upper - lower) / 2 * x  # mapped to [sigma_t, sigma_{t+1}]
    basis = np.ones_like(tau)
    for k, node in enumerate(nodes):
        if k != current_order:
            basis *= (tau - node) / (nodes[current_order] - node)
    return float((upper - lower) / 2 * np.dot(w, basis))


class LMSDiscreteScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Linear multistep sampling of the probability-flow ODE in sigma (k-diffusion `sample_lms`, order 4 by default).

    diffusers twin: `schedulers/scheduling_lms_discrete.py LMSDiscreteScheduler`; same config keys and
    defaults; numbers within float32 rounding (verified by `parity_tests/test_scheduling_lms_discrete.py`).

    Each step keeps the last `order` derivatives d_j = (x_j - D(x_j; sigma_j)) / sigma_j and moves
    x_{i+1} = x_i + sum_j c_j d_{i-j}, with c_j the integral of the j-th Lagrange basis polynomial over
    [sigma_i, sigma_{i+1}] (`lms_coefficient`). The first steps use as many derivatives as exist.
    A diffusers quirk kept for parity: the order is min(step_index + 1, order), so a loop that starts
    part-way (img2img, `set_begin_index`) uses the order-4 coefficients with fewer than 4 derivatives
    on its first steps (zip drops the rest), not the lower-order method k-diffusion would use.

    Config (diffusers' names and defaults): num_train_timesteps, beta_start, beta_end, beta_schedule
    ("linear", "scaled_linear", "squaredcos_cap_v2"), trained_betas; use_karras_sigmas /
    use_exponential_sigmas / use_beta_sigmas (at most one); prediction_type ("epsilon", "sample",
    "v_prediction"); timestep_spacing, steps_offset.

    Where pare differs from diffusers on purpose: the coefficients are exact integrals of the
    Lagrange polynomials (Gauss-Legendre, `lms_coefficient`) instead of scipy.integrate.quad of a float32
    integrand (they differ by up to ~1.5e-6 of the step size: float32 samples agree to rel L2 1e-6,
    float64 ones to ~1e-7, not to the 1e-10 of exactly shared arithmetic); `order` must be an int >= 1; num_inference_steps
    of 0 or below, unknown config values and a timestep not in the schedule raise a ValueError.
    "trailing" spacing never gains diffusers' spurious extra timestep -1. `get_velocity` is not provided.
    A schedule whose first timestep repeats (e.g. Karras levels of the cosine schedule) starts at its first
    level, where diffusers skips one (`SigmaSchedulerMixin._init_step_index`).
    """

    start_at_first_timestep = True  # a repeated first timestep starts at 0 (SigmaSchedulerMixin._init_step_index)
    integer_timesteps_allowed = True  # looked up in the float schedule, as diffusers does
    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
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
        self.set_timesteps(num_train_timesteps, None)
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (diffusers' rule)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_sigma / sqrt(sigma^2 + 1): the DDPM x_t the model was trained on."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample / ((sigma**2 + 1) ** 0.5)
        self.is_scale_input_called = True
        return sample

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """diffusers' method name for `lms_coefficient` on this schedule's sigmas."""
        return lms_coefficient(self.sigmas, order, t, current_order)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """`num_inference_steps` timesteps per `timestep_spacing` and their sigmas (optionally respaced), then 0."""
        c = self.config
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        timesteps = float_spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        # LMS's Karras levels always span the interpolated schedule (LMS has no sigma_min / sigma_max keys).
        respaced = convert_sigmas(c, sigmas, self.num_inference_steps)
        if respaced is not None:
            sigmas, timesteps = respaced, timesteps_for_sigmas(respaced, log_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")  # read step by step on the host: no device syncs
        self.timesteps = to_device(torch.from_numpy(timesteps), device, torch.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []  # d_i, d_{i-1}, ... (oldest first), at most `order` of them

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One linear multistep step sigma_i -> sigma_{i+1} (k-diffusion `sample_lms`). Arithmetic in the inputs' dtype."""
        # Notation (sample_lms):  sigma -> sigmas[i]   pred_original_sample -> denoised
        #   derivative -> d = to_d(x, sigma, denoised)   lms_coeffs -> linear_multistep_coeff(order, sigmas, i, j)
        self._check_step_input(model_output, timestep, sample)
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order={order!r}: the number of past derivatives LMS combines must be an int >= 1")
        if not self.is_scale_input_called:
            logger.warning("LMSDiscreteScheduler.step() before scale_model_input(): the model saw an unscaled input")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]

        # 1. the denoised D(x; sigma) (EDM, arXiv 2206.00364, Table 1, VP preconditioning)
        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:  # sample
            pred_original_sample = model_output

        # 2. d_i = (x_i - D) / sigma_i, appended to the last `order` derivatives
        derivative = (sample - pred_original_sample) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # 3. the coefficients: integrals of the Lagrange basis over [sigma_i, sigma_{i+1}], as many as there are derivatives
        order = min(self.step_index + 1, order)
        lms_coeffs = [self.get_lms_coefficient(order, self.step_index, j) for j in range(order)]

        # 4. x_{i+1} = x_i + sum_j c_j d_{i-j}
        prev_sample = sample + sum(coeff * d for coeff, d in zip(lms_coeffs, reversed(self.derivatives)))

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample, pred_original_sample)
