"""UniPC: a unified predictor-corrector for the diffusion ODE, multistep, of any order.

diffusers twin: `schedulers/scheduling_unipc_multistep.py` (`UniPCMultistepScheduler`).
Source: Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", arXiv 2302.04867: the predictor UniP-p and the corrector UniC-p
(section 3; the multistep data- and noise-prediction algorithms of the appendix), with the
step factor B(h) = h ("bh1") or e^h - 1 ("bh2").

Notation (as `scheduling_dpmsolver_multistep`, whose helpers this file reuses):
    sigma            -> the noise level sqrt((1 - alpha_bar) / alpha_bar) that `self.sigmas` stores
    alpha_t, sigma_t -> x_t = alpha_t x_0 + sigma_t eps;  lambda_t = log(alpha_t / sigma_t)
    h                -> lambda_t - lambda_s0, the step in lambda; hh = -h for data prediction, +h for noise
    m0, m_i          -> the converted model outputs (x_0 if predict_x0, else eps) at s0 (newest) and s_i
    r_i              -> (lambda_{s_i} - lambda_s0) / h;   D1_i = (m_i - m0) / r_i, the scaled differences
    rhos             -> the weights of the D1_i, solving R rho = b with R_{kj} = r_j^k and
                        b_k = k! phi_{k+1}(hh) / B(h)  (the order conditions of UniP / UniC)

One `step` = corrector, then predictor: the new model output first corrects the sample the last
predictor made (UniC, "the corrector's last sample" is `last_sample`), then the predictor steps
from the corrected sample (UniP). The last step's prediction is returned uncorrected: correcting
it would take one more model evaluation.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import torch

from ..configuration import Config, register_to_config
from .schedule import check_num_inference_steps
from .scheduling_dpmsolver_multistep import (
    FINAL_SIGMAS_TYPES,
    FLOW_MATCHING_CONFIG,
    add_vp_noise,
    check_solver_timesteps,
    solver_timesteps,
    convert_model_output,
    log_snr,
    vp_alpha_sigma,
)
from .scheduling_utils import DiscreteScheduler, SchedulerOutput, check_choice, coefficients_on, threshold_sample, to_device
from .sigmas import SigmaSchedulerMixin, convert_sigmas, timesteps_for_sigmas, train_sigmas

logger = logging.getLogger("pare")

SOLVER_TYPES = ("bh1", "bh2")
# Other solvers' solver_type values: diffusers reads them as bh2 (a DPM-Solver / DEIS config loaded into UniPC).
FOREIGN_SOLVER_TYPES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
# Keys for flow matching (not Stable Diffusion) and a scheduler-in-a-scheduler: the one value pare supports.
UNSUPPORTED_CONFIG = {**FLOW_MATCHING_CONFIG, "shift_terminal": None, "solver_p": None}


def solver_sigmas(scheduler, timesteps: np.ndarray, num_inference_steps: int, final_sigma: str):
    """(sigmas with the end level appended (float32), timesteps) of a DPM-family scheduler's config.

    The levels are interpolated at the timesteps, or (use_karras / exponential / beta sigmas) spaced on their
    own, the timesteps then following from sigma (Karras' rounded, exponential / beta ones truncated, as in
    diffusers). `final_sigma`: "zero" ends at sigma = 0 (x_0), "sigma_min" at the smallest spaced level
    (the smallest trained one without a spacing of its own), "repeat" at the smallest spaced level (DEIS).
    """
    c, alphas_cumprod = scheduler.config, scheduler.alphas_cumprod
    sigmas = train_sigmas(alphas_cumprod)  # (T,) ascending, float32
    log_sigmas = np.log(sigmas)
    spaced = convert_sigmas(c, np.flip(sigmas).copy(), num_inference_steps)
    if spaced is not None:
        timesteps = timesteps_for_sigmas(spaced, log_sigmas)
        if c.use_karras_sigmas:
            timesteps = timesteps.round()
        sigmas = spaced
        sigma_last = 0 if final_sigma == "zero" else sigmas[-1]
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigma_last = 0 if final_sigma == "zero" else ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    return np.concatenate([sigmas, [sigma_last]]).astype(np.float32), timesteps


class UniPCMultistepScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """UniPC (arXiv 2302.04867): UniC-p corrector + UniP-p predictor, multistep, B(h) = h or e^h - 1.

    diffusers twin: `schedulers/scheduling_unipc_multistep.py UniPCMultistepScheduler`; same config keys,
    defaults, state (`model_outputs`, `last_sample`, `this_order`, `lower_order_nums`) and numbers (verified
    by `parity_tests/test_scheduling_unipc_multistep.py`).

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear", "squaredcos_cap_v2"),
            trained_betas, rescale_betas_zero_snr: the training noise schedule (zero SNR: alpha_bar_T is set to
            2**-24, float16's smallest subnormal, so that sigma_T stays finite, as diffusers does).
        solver_order (any positive int; the corrector adds one order), solver_type ("bh1", "bh2"),
            predict_x0 (integrate x_0, the data prediction, or eps), lower_order_final (the order drops to
            the steps left at the end), disable_corrector (step indices whose sample is not corrected).
        use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (with sigma_min / sigma_max),
            timestep_spacing, steps_offset, final_sigmas_type ("zero", "sigma_min"): the timesteps and levels.
        prediction_type ("epsilon", "sample", "v_prediction"), thresholding, dynamic_thresholding_ratio,
            sample_max_value (applied to x_0 when predict_x0).
    Not Stable Diffusion, so `unsupported_config` (a config that turns one on is refused, naming the key):
    the flow-matching keys (use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, shift_terminal,
    prediction_type "flow_prediction") and solver_p (another scheduler as the predictor).

    Where pare differs from diffusers on purpose (each raises a ValueError where diffusers goes on):
    num_inference_steps < 1; unknown config values; "leading" spacing past T-1; spacings that repeat a
    timestep; a timestep that is not in the schedule (diffusers silently takes the last step); a step after
    the last one; `sigmas` or `mu` (flow matching only). "trailing" spacing never gains diffusers' spurious
    timestep -1 (see `solver_timesteps`). At the last step, which ends at sigma = 0 with the default
    final_sigmas_type="zero" (lambda = +inf there):
      - solver_type="bh1": diffusers subtracts B(h) * 0 = -inf * 0 and returns NaN; pare returns the
        first-order step, which there is the predicted x_0 (bh2 gives the same value in both libraries);
      - predict_x0=False, or lower_order_final=False with solver_order >= 2, cannot reach sigma = 0 at all
        (diffusers: NaN, or a singular matrix in torch.linalg.solve): pare refuses the config, naming the fix.
    And a step of zero length in lambda (Karras / exponential / beta sigmas with final_sigmas_type="sigma_min"
    end with one) returns its input, the h -> 0 limit; diffusers computes phi_k(0) as 0 / 0 and returns NaN
    there for orders >= 3 (lower_order_final=False), the same value as pare otherwise.
    Kept from diffusers: exponential / beta sigmas can start with a repeated timestep; the first step then
    starts at the second (the img2img rule of `index_for_timestep`) and the loop runs out one step early
    (diffusers: an AssertionError; pare: a ValueError). `set_begin_index(0)` before the loop avoids it.
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    unsupported_config = UNSUPPORTED_CONFIG

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 (diffusers' default; register_to_config stores a copy)
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ):
        owner, c = type(self).__name__, self.config
        if c.solver_type in FOREIGN_SOLVER_TYPES:
            logger.warning("%s: reading solver_type=%r (another solver's value) as 'bh2', as diffusers does", owner, c.solver_type)
            object.__setattr__(self, "_pare_config", Config({**c, "solver_type": FOREIGN_SOLVER_TYPES[c.solver_type]}))
            c = self.config
        check_choice(owner, "solver_type", c.solver_type, SOLVER_TYPES)
        check_choice(owner, "final_sigmas_type", c.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if isinstance(solver_order, bool) or not isinstance(solver_order, numbers.Integral) or solver_order < 1:
            raise ValueError(f"{owner}: solver_order must be a positive int, got {solver_order!r}")
        if not all(isinstance(i, numbers.Integral) for i in disable_corrector):
            raise ValueError(f"{owner}: disable_corrector must list step indices (ints), got {disable_corrector!r}")
        if c.thresholding and not 0 <= c.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"{owner}: dynamic_thresholding_ratio must lie in [0, 1], got {c.dynamic_thresholding_ratio!r}")
        if c.final_sigmas_type == "zero" and not predict_x0:
            # The last step ends at sigma_t = 0, where lambda_t = +inf: the noise-prediction update is 0 * inf (diffusers: NaN).
            raise ValueError(
                f"{owner}: predict_x0=False cannot step to sigma = 0 (final_sigmas_type='zero'): the noise-prediction "
                "update multiplies sigma_t = 0 by e^h - 1 = inf there; use final_sigmas_type='sigma_min', or predict_x0=True"
            )
        if c.final_sigmas_type == "zero" and not c.lower_order_final and solver_order >= 2:
            # A multistep update to lambda = +inf extrapolates the outputs' polynomial to infinity (diffusers: NaN,
            # or a singular matrix in torch.linalg.solve for orders >= 3).
            raise ValueError(
                f"{owner}: lower_order_final=False with solver_order={solver_order} takes a multistep step to sigma = 0 "
                "(final_sigmas_type='zero'), which has no finite value: set lower_order_final=True, or final_sigmas_type='sigma_min'"
            )
        self._build_betas()  # betas, alphas, alphas_cumprod; checks beta_schedule, prediction_type, the sigma options
        if rescale_betas_zero_snr:
            # alpha_bar_T = 0 would make sigma_T infinite: diffusers uses float16's smallest subnormal instead.
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        # Before set_timesteps: every training timestep, as float32 (diffusers' placeholder).
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.timestep_list: list = [None] * solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None

    # --- timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose the timesteps (`self.timesteps`, int64) and their noise levels (`self.sigmas`, float32, one more: the end)."""
        owner, c = type(self).__name__, self.config
        if sigmas is not None or mu is not None:
            raise ValueError(
                f"{owner}.set_timesteps: custom sigmas and mu belong to flow-matching schedules (use_flow_sigmas, "
                "use_dynamic_shifting), which pare does not implement"
            )
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        timesteps = solver_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        check_solver_timesteps(timesteps, c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        sigmas, timesteps = solver_sigmas(self, timesteps, n, c.final_sigmas_type)
        self.sigmas = torch.from_numpy(sigmas)  # (n + 1,), CPU
        self.timesteps = to_device(torch.from_numpy(np.asarray(timesteps)), device, torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self._step_index = None
        self._begin_index = None

    # --- one step

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 (predict_x0, thresholded if the config says so) or eps at the current step, from the model's prediction."""
        c = self.config
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[self.step_index])
        threshold = None
        if c.thresholding and self.predict_x0:  # diffusers thresholds the data prediction only
            def threshold(x0):
                return threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return convert_model_output(model_output, sample, alpha_t, sigma_t, c.prediction_type, self.predict_x0, threshold)

    def _coefficients(self, i_t: int, i_s0: int, previous: list[int], order: int):
        """What UniP and UniC share for a step s0 -> t: (alpha_t, sigma_t, sigma_s0 / alpha_s0 ratio terms, h_phi_1, B_h, R, b, rks).

        `previous` are the sigma indices of s_1, s_2, ... (newest first), `order` the p of UniP-p / UniC-p.
        """
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i_t])
        alpha_s0, sigma_s0 = vp_alpha_sigma(self.sigmas[i_s0])
        h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s0, sigma_s0)

        # 1. r_i = (lambda_{s_i} - lambda_s0) / h for the earlier outputs, and r = 1 for the new point
        rks = [(log_snr(*vp_alpha_sigma(self.sigmas[si])) - log_snr(alpha_s0, sigma_s0)) / h for si in previous[: order - 1]]
        rks = torch.stack(rks + [torch.ones(())])  # (order,)

        # 2. the order conditions R rho = b: R_{kj} = r_j^(k-1), b_k = (k-1)! phi_k(hh) / B(h), k = 1 .. order,
        #    with h phi_1(hh) = e^hh - 1 and phi_{k+1}(hh) = (phi_k(hh) - 1 / k!) / hh (the phi recursion)
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)  # B_1(h) = h, B_2(h) = e^h - 1
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return alpha_t, sigma_t, alpha_s0, sigma_s0, h, h_phi_1, B_h, torch.stack(R), torch.stack(b), rks

    def _update(self, x, m0, D1s, rhos, D1_t, rho_t, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h):
        """x_t = (the exponential-integrator step of order 1) - B(h) sum_k rho_k D1_k  (UniP), or with UniC's extra term."""
        if self.predict_x0:  # data prediction: x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) x_0 - alpha_t B(h) res
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            scale = alpha_t * B_h
        else:  # noise prediction: DPM-Solver-1 plus the correction
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            scale = sigma_t * B_h
        if D1s is None and D1_t is None:
            # A first-order prediction has no correction term. diffusers still subtracts B(h) * 0, which is NaN when
            # the step ends at sigma = 0 with bh1 (B(h) = h = -inf there); pare returns the first-order step.
            return x_t_
        res = torch.einsum("k,bkc...->bc...", rhos, D1s) if D1s is not None else 0  # sum_k rho_k D1_k: (K,), (B, K, C, ...) -> (B, C, ...)
        if D1_t is not None:  # the corrector: the new output enters with weight rho_t
            res = res + rho_t * D1_t
        return x_t_ - scale * res

    def multistep_uni_p_bh_update(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-p: predict x at sigmas[i + 1] from x at sigmas[i] and the last `order` outputs (section 3)."""
        i = self.step_index
        m = self.model_outputs
        m0, x = m[-1], sample
        alpha_t, sigma_t, alpha_s0, sigma_s0, h, h_phi_1, B_h, R, b, rks = self._coefficients(
            i + 1, i, [i - k for k in range(1, order)], order)
        if h == 0:
            # A step of zero length (Karras / exponential / beta sigmas with final_sigmas_type="sigma_min" end with
            # one): x_t = x_s exactly, the h -> 0 limit; diffusers evaluates phi_k(0) as 0 / 0 (NaN at orders >= 3).
            return sample

        # D1_k = (m_k - m0) / r_k for the earlier outputs, k = 1 .. order - 1: (B, K, C, ...)
        D1s = [(m[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        D1s = torch.stack(D1s, dim=1) if D1s else None
        rhos_p = None
        if D1s is not None:
            # order 2 has one unknown: UniPC fixes rho = 1/2 (the paper's simplified choice for p = 2)
            if order == 2:
                rhos_p = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
            else:
                rhos_p = coefficients_on(torch.linalg.solve(R[:-1, :-1], b[:-1]), x)
        x_t = self._update(x, m0, D1s, rhos_p, None, None, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h)
        return x_t.to(x.dtype)

    def multistep_uni_c_bh_update(self, this_model_output: torch.Tensor, last_sample: torch.Tensor,
                                  this_sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniC-p: correct the predicted x at sigmas[i] with the model's output there (section 3).

        The step is redone from `last_sample` (x at sigmas[i - 1], before the predictor) with the new output
        `this_model_output` at the far end as one more interpolation point, raising the order by one.
        """
        i = self.step_index
        m = self.model_outputs
        m0, x = m[-1], last_sample
        alpha_t, sigma_t, alpha_s0, sigma_s0, h, h_phi_1, B_h, R, b, rks = self._coefficients(
            i, i - 1, [i - 1 - k for k in range(1, order)], order)
        if h == 0:
            return this_sample  # nothing to correct over a step of zero length (see multistep_uni_p_bh_update)

        D1s = [(m[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        D1s = torch.stack(D1s, dim=1) if D1s else None
        # order 1 has one unknown: rho = 1/2 (the trapezoidal rule); else all `order` weights from R rho = b
        if order == 1:
            rhos_c = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        else:
            rhos_c = coefficients_on(torch.linalg.solve(R, b), x)
        D1_t = this_model_output - m0
        x_t = self._update(x, m0, D1s, rhos_c[:-1] if D1s is not None else None, D1_t, rhos_c[-1],
                           alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h)
        return x_t.to(x.dtype)

    def corrects(self, i: int) -> bool:
        """Whether step i corrects the sample the last predictor made: not at the first step (no predictor ran), nor
        after a step that `disable_corrector` names."""
        return i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None

    def order_of_step(self, i: int, n: int) -> int:
        """The predictor's order at step i of n (its corrector's at step i + 1), given the steps taken so far
        (`lower_order_nums`): solver_order, at most one more than the outputs so far (a multistep method has no
        history at first), and with lower_order_final at most the steps left."""
        c = self.config
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        return min(order, self.lower_order_nums + 1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One UniPC step at sigmas[i], i = `step_index`: correct x_i with the new output (UniC), then predict x_{i+1} (UniP)."""
        c = self.config
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        i, n = self._start_step(timestep)

        # 1. the corrector, UniC-p with the previous step's order: refines the sample the last predictor made
        model_output_convert = self.convert_model_output(model_output, sample)
        if self.corrects(i):
            sample = self.multistep_uni_c_bh_update(model_output_convert, self.last_sample, sample, self.this_order)

        # 2. the history of converted outputs (newest last)
        self.model_outputs = self.model_outputs[1:] + [model_output_convert]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        # 3. this step's order
        self.this_order = self.order_of_step(i, n)

        # 4. the predictor, UniP-p, from the corrected sample (kept for the next corrector)
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(sample, self.this_order)
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
