"""DPM-Solver and DPM-Solver++ (multistep): high-order exponential integrators for the diffusion ODE (and SDE).

diffusers twin: `schedulers/scheduling_dpmsolver_multistep.py` (`DPMSolverMultistepScheduler`).
Sources:
    Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
        arXiv 2206.00927 (noise prediction: eq. 3.4, DPM-Solver-1 eq. 3.7, log-SNR step sizes section 3.3).
    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv 2211.01095 (data prediction: section 4, Algorithm 1 = 2S, Algorithm 2 = 2M; SDE-DPM-Solver++ section 5).

Notation (shared with the singlestep and EDM twins, which import the functions below):
    sigma (no subscript)  -> the "Karras" noise level sqrt((1 - alpha_bar) / alpha_bar) that `self.sigmas` stores
    alpha_t, sigma_t      -> the VP coefficients of x_t = alpha_t x_0 + sigma_t eps: alpha_t = 1 / sqrt(sigma^2 + 1),
                             sigma_t = sigma * alpha_t (DPM-Solver section 2)
    lambda_t              -> log(alpha_t / sigma_t), half the log-SNR (DPM-Solver, before eq. 3.4)
    h                     -> lambda_t - lambda_s, the step in lambda
    m0, m1, m2            -> the converted model outputs (x_0 for DPM-Solver++, eps for DPM-Solver) at s0, s1, s2,
                             newest first; D0, D1, D2 their divided differences in lambda
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import Config, register_to_config
from .schedule import check_custom_timesteps, check_num_inference_steps
from .scheduling_utils import DiscreteScheduler, Generator, SchedulerOutput, check_choice, randn_tensor, threshold_sample, to_device
from .sigmas import SigmaSchedulerMixin, convert_sigmas, timesteps_for_sigmas, train_sigmas

logger = logging.getLogger("pare")

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
DATA_PREDICTION_TYPES = ("dpmsolver++", "sde-dpmsolver++")  # solve the ODE of x_0 (DPM-Solver++); else of eps
SDE_TYPES = ("sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
SOLVER_ORDERS = (1, 2, 3)
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")  # the model's output carries a variance after the mean
# DDPM's fixed variances describe the training, not the output: diffusers reads them (and None) as "no variance".
VARIANCE_TYPES = (None, *LEARNED_VARIANCE_TYPES, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
# Values that DEIS / UniPC configs carry in the same keys; diffusers reads them as these DPM-Solver values.
FOREIGN_VALUES = {
    "algorithm_type": {"deis": "dpmsolver++"},
    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
}
# Flow matching (SD3, Flux, Sana): not Stable Diffusion. diffusers' keys for it, and the one value pare supports.
FLOW_MATCHING_CONFIG = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
                        "time_shift_type": "exponential"}


# --- the solver, as plain functions (DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler and UniPC/DEIS reuse them)


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process at noise level sigma: x_t = alpha_t x_0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t) - log(sigma_t); +inf at sigma_t = 0, the end of sampling."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def convert_model_output(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
    data_prediction: bool,
    threshold=None,
) -> torch.Tensor:
    """What the solver integrates: x_0 ("data prediction", DPM-Solver++ section 4) or eps (DPM-Solver eq. 3.4).

    Both follow from x_t = alpha_t x_0 + sigma_t eps and the model's prediction_type (v = alpha_t eps - sigma_t x_0).
    `threshold`, if given, maps a predicted x_0 to a thresholded one (Imagen's dynamic thresholding); for
    noise prediction eps is re-derived from the thresholded x_0.
    diffusers twin: `DPMSolverMultistepScheduler.convert_model_output`.
    """
    if data_prediction:
        if prediction_type == "epsilon":
            x0_pred = (sample - sigma_t * model_output) / alpha_t
        elif prediction_type == "sample":
            x0_pred = model_output
        elif prediction_type == "v_prediction":
            x0_pred = alpha_t * sample - sigma_t * model_output
        else:
            raise ValueError(f"prediction_type={prediction_type!r}; expected epsilon, sample or v_prediction")
        return threshold(x0_pred) if threshold is not None else x0_pred

    if prediction_type == "epsilon":
        epsilon = model_output
    elif prediction_type == "sample":
        epsilon = (sample - alpha_t * model_output) / sigma_t
    elif prediction_type == "v_prediction":
        epsilon = alpha_t * model_output + sigma_t * sample
    else:
        raise ValueError(f"prediction_type={prediction_type!r}; expected epsilon, sample or v_prediction")
    if threshold is not None:
        x0_pred = threshold((sample - sigma_t * epsilon) / alpha_t)
        epsilon = (sample - alpha_t * x0_pred) / sigma_t
    return epsilon


def first_order_update(algorithm_type, sample, m0, alpha_t, sigma_t, alpha_s, sigma_s, noise=None) -> torch.Tensor:
    """One first-order step s -> t: DPM-Solver-1 (eq. 3.7 of arXiv 2206.00927) = DDIM, or its data-prediction /
    SDE forms (DPM-Solver++, arXiv 2211.01095, section 4.1 and section 5)."""
    h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
    if algorithm_type == "dpmsolver++":  # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x_0
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    if algorithm_type == "dpmsolver":  # eq. 3.7: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps
        return (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * m0
    if algorithm_type == "sde-dpmsolver++":
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    if algorithm_type == "sde-dpmsolver":
        return (
            (alpha_t / alpha_s) * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * m0
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )
    raise ValueError(f"algorithm_type={algorithm_type!r}; expected one of {ALGORITHM_TYPES}")


def multistep_second_order_update(algorithm_type, solver_type, sample, m, alphas, sigmas, noise=None) -> torch.Tensor:
    """One 2M step s0 -> t from the outputs at s0 and s1 (DPM-Solver++, arXiv 2211.01095, Algorithm 2).

    m = [..., m1, m0] (newest last, as `model_outputs` keeps them); alphas / sigmas = (t, s0, s1).
    """
    (alpha_t, alpha_s0, alpha_s1), (sigma_t, sigma_s0, sigma_s1) = alphas, sigmas
    lambda_t, lambda_s0, lambda_s1 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0), log_snr(alpha_s1, sigma_s1)
    m0, m1 = m[-1], m[-2]
    # 1. step sizes in lambda: h this step, h_0 the previous one; r0 their ratio
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    # 2. D1 ~ h * dm/dlambda at s0: the backward difference, scaled to this step
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    # 3. integrate from s0
    return second_order_update(algorithm_type, solver_type, sample, h, D0, D1, alpha_t, sigma_t, alpha_s0, sigma_s0, noise)


def second_order_update(algorithm_type, solver_type, sample, h, D0, D1, alpha_t, sigma_t, alpha_s, sigma_s, noise=None):
    """x_t from x_s with the model output taken as linear in lambda: m(lambda) ~ D0 + (lambda - lambda_s) / h * D1.

    "midpoint" keeps the first-order coefficient for D1 / 2 (DPM-Solver++ Algorithms 1-2, DPM-Solver Algorithm 1);
    "heun" integrates the line exactly (the first two Taylor terms of DPM-Solver, arXiv 2206.00927, eq. 3.6).
    The multistep (2M) and singlestep (2S) solvers differ only in where D0, D1 come from.
    The operations run in diffusers' order, so that both libraries round alike.
    """
    if algorithm_type == "dpmsolver++":
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )
        return (
            (sigma_t / sigma_s) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        )
    if algorithm_type == "dpmsolver":
        if solver_type == "midpoint":
            return (
                (alpha_t / alpha_s) * sample
                - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
            )
        return (
            (alpha_t / alpha_s) * sample
            - (sigma_t * (torch.exp(h) - 1.0)) * D0
            - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        )
    if algorithm_type == "sde-dpmsolver++":
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s * torch.exp(-h)) * sample
                + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
                + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    if algorithm_type == "sde-dpmsolver":
        if solver_type == "midpoint":
            return (
                (alpha_t / alpha_s) * sample
                - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * (torch.exp(h) - 1.0)) * D1
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
            )
        return (
            (alpha_t / alpha_s) * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
            - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )
    raise ValueError(f"algorithm_type={algorithm_type!r}; expected one of {ALGORITHM_TYPES}")


def multistep_third_order_update(algorithm_type, sample, m, alphas, sigmas, noise=None) -> torch.Tensor:
    """One 3M step s0 -> t from the outputs at s0, s1, s2: the second-order Taylor term of eq. 3.6 of arXiv 2206.00927,
    with D1, D2 from divided differences (the multistep DPM-Solver-3 of the authors' code). alphas / sigmas = (t, s0, s1, s2)."""
    (alpha_t, alpha_s0, alpha_s1, alpha_s2), (sigma_t, sigma_s0, sigma_s1, sigma_s2) = alphas, sigmas
    lambda_t, lambda_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
    lambda_s1, lambda_s2 = log_snr(alpha_s1, sigma_s1), log_snr(alpha_s2, sigma_s2)
    m0, m1, m2 = m[-1], m[-2], m[-3]
    # 1. step sizes in lambda, relative to this step
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    # 2. first and second divided differences
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    # 3. integrate the quadratic interpolant exactly
    if algorithm_type == "dpmsolver++":
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "dpmsolver":
        return (
            (alpha_t / alpha_s0) * sample
            - (sigma_t * (torch.exp(h) - 1.0)) * D0
            - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "sde-dpmsolver++":
        return (
            (sigma_t / sigma_s0 * torch.exp(-h)) * sample
            + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    raise ValueError(f"algorithm_type={algorithm_type!r} has no third-order multistep update (diffusers has none either)")


# --- what the three twins share besides the updates


def ode_type(algorithm_type: str) -> str:
    """The ODE solver of an SDE algorithm_type (sde-dpmsolver++ -> dpmsolver++)."""
    return algorithm_type.removeprefix("sde-")


def degenerate_step(algorithm_type, alpha_t, sigma_t, alpha_s, sigma_s) -> bool:
    """Whether the step s -> t has zero length in lambda, or (for an SDE) a rounding-error negative one.

    The Karras / Lu / exponential / beta spacings end at sigma_min, and final_sigmas_type="sigma_min" repeats
    it (to an ulp). Such a step is taken as a first-order ODE step, the limit h -> 0 of every update: diffusers
    evaluates heun's and the third order's (e^-h - 1) / h at h = 0, and an SDE's sqrt(1 - e^-2h) at h < 0,
    and returns NaN. Where diffusers stays finite (h = 0, midpoint or first order) it gives the same numbers.
    """
    h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
    return bool(h == 0) or (algorithm_type in SDE_TYPES and bool(h < 0))


def add_vp_noise(scheduler, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process x_t = alpha_t x_0 + sigma_t eps at `scheduler.sigmas`, by each timestep's place in the schedule.

    The place is found as `SigmaSchedulerMixin.add_noise` finds it: the timestep's position before the loop has
    begun (training, or no begin_index), `begin_index` when a pipeline set it (img2img), else the current step.
    """
    sigmas = scheduler.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
    schedule_timesteps = scheduler.timesteps.to(original_samples.device)
    timesteps = torch.as_tensor(timesteps).to(original_samples.device).reshape(-1)  # (B,)
    if scheduler.begin_index is None:
        step_indices = [scheduler.index_for_timestep(t, schedule_timesteps) for t in timesteps]
    elif scheduler.step_index is not None:
        step_indices = [scheduler.step_index] * timesteps.shape[0]
    else:
        step_indices = [scheduler.begin_index] * timesteps.shape[0]
    sigma = sigmas[step_indices].flatten().reshape(-1, *[1] * (original_samples.ndim - 1))  # (B,) -> (B, 1, ..., 1)
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return alpha_t * original_samples + sigma_t * noise


def last_unclipped_timestep(scheduler) -> int:
    """T minus the timesteps whose lambda lies below `lambda_min_clipped` (the cosine schedule's plunges at the end)."""
    clipped_idx = torch.searchsorted(torch.flip(scheduler.lambda_t, [0]), scheduler.config.lambda_min_clipped)
    return int(scheduler.config.num_train_timesteps - clipped_idx)


def solver_timesteps(timestep_spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """The integer timesteps of the DPM-Solver family (DPM-Solver, UniPC, DEIS): n of n + 1 spaced points over
    [0, last_timestep), the last (t = 0) dropped. `last_timestep`: T (the default), or DPM-Solver's
    `last_unclipped_timestep`.

    The spacings of Lin et al., arXiv 2305.08891, Table 2, as diffusers' multistep solvers compute them:
        linspace  round(linspace(0, last-1, n+1))[::-1][:-1]
        leading   (arange(n+1) * (last // (n+1)))[::-1][:-1] + steps_offset
        trailing  round(arange(last, 0, -T/n)) - 1         (T/n, not last/n, as in diffusers)

    Where pare differs from diffusers on purpose: "trailing" drops the spurious -1 of np.arange's overshoot
    (n = 61 of T = 1000, say: diffusers visits n + 1 timesteps, the last -1). `check_solver_timesteps`
    refuses the spacings a solver cannot take.
    """
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if timestep_spacing == "trailing":
        timesteps = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
        return timesteps[timesteps >= 0]  # np.arange may overshoot by one float step, to round(~0) - 1 = -1
    raise ValueError(f"timestep_spacing={timestep_spacing!r} is unknown; expected linspace, leading or trailing")


def check_solver_timesteps(timesteps: np.ndarray, timestep_spacing: str, num_inference_steps: int,
                           num_train_timesteps: int, steps_offset: int = 0, context: str = "") -> None:
    """Spaced timesteps whose noise levels are interpolated must lie in [0, T-1] and be distinct."""
    T, n = num_train_timesteps, num_inference_steps
    if len(timesteps) and timesteps.max() >= T:
        # diffusers clamps the noise level to sigma_{T-1} and hands the model a timestep it was never trained on.
        raise ValueError(
            f"timestep_spacing='leading' with steps_offset={steps_offset} and num_inference_steps={n} gives "
            f"timestep {int(timesteps.max())}, past the last trained timestep {T - 1}: use fewer steps or steps_offset=0"
        )
    if len(timesteps) == 0 or (np.diff(timesteps) >= 0).any():
        raise ValueError(
            f"timestep_spacing={timestep_spacing!r} with num_inference_steps={n} of num_train_timesteps={T}{context} "
            f"repeats timesteps ({timesteps.tolist()[:8]} ...): they must be distinct, because the solver divides by "
            "the log-SNR step between them; use fewer steps"
        )


def resolve_foreign_values(scheduler) -> None:
    """Read a DEIS / UniPC value in algorithm_type / solver_type as diffusers does (FOREIGN_VALUES), with a note."""
    c, owner = scheduler.config, type(scheduler).__name__
    changed = {key: FOREIGN_VALUES[key][c[key]] for key in FOREIGN_VALUES if key in c and c[key] in FOREIGN_VALUES[key]}
    if changed:
        logger.warning("%s: reading %s as %s (values of another scheduler's config), as diffusers does",
                       owner, {k: c[k] for k in changed}, changed)
        object.__setattr__(scheduler, "_pare_config", Config({**c, **changed}))


def check_solver_config(scheduler, algorithm_types: tuple[str, ...]) -> None:
    """The checks the three DPM-Solver twins share (after `resolve_foreign_values`)."""
    c, owner = scheduler.config, type(scheduler).__name__
    check_choice(owner, "algorithm_type", c.algorithm_type, algorithm_types)
    check_choice(owner, "solver_type", c.solver_type, SOLVER_TYPES)
    check_choice(owner, "solver_order", c.solver_order, SOLVER_ORDERS)
    check_choice(owner, "final_sigmas_type", c.final_sigmas_type, FINAL_SIGMAS_TYPES)
    if c.thresholding and not 0 <= c.dynamic_thresholding_ratio <= 1:
        raise ValueError(f"{owner}: dynamic_thresholding_ratio must lie in [0, 1], got {c.dynamic_thresholding_ratio!r}")
    if c.algorithm_type not in DATA_PREDICTION_TYPES and c.final_sigmas_type == "zero":
        # eps-prediction steps divide by sigma_t and take log(sigma_t): sigma = 0 cannot be reached (diffusers raises too).
        raise ValueError(
            f"{owner}: final_sigmas_type='zero' is not supported for algorithm_type={c.algorithm_type!r}, which "
            f"predicts noise: use final_sigmas_type='sigma_min', or an algorithm_type in {DATA_PREDICTION_TYPES}"
        )


class DPMSolverMultistepScheduler(SigmaSchedulerMixin, DiscreteScheduler):
    """Multistep DPM-Solver (arXiv 2206.00927) and DPM-Solver++ (arXiv 2211.01095, Algorithm 2 "2M"), ODE or SDE.

    diffusers twin: `schedulers/scheduling_dpmsolver_multistep.py DPMSolverMultistepScheduler`; same config keys,
    defaults and numbers (verified by `parity_tests/test_scheduling_dpmsolver_multistep.py`). "DPM++ 2M" of the
    web UIs is algorithm_type="dpmsolver++", solver_order=2; "DPM++ 2M SDE" is "sde-dpmsolver++"; add
    use_karras_sigmas=True for "... Karras".

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear", "squaredcos_cap_v2"),
            trained_betas, rescale_betas_zero_snr: the training noise schedule (`schedule.py`).
        solver_order (1, 2, 3), algorithm_type, solver_type ("midpoint", "heun"): the solver.
        lower_order_final (first/second order at the last steps when there are < 15), euler_at_final,
            final_sigmas_type ("zero": end at x_0; "sigma_min": end at the smallest trained noise level).
        use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas (uniform lambda,
            DPM-Solver section 3.3), timestep_spacing, steps_offset, lambda_min_clipped: the timesteps.
        prediction_type, variance_type ("learned", "learned_range": the output carries a variance, dropped),
            thresholding, dynamic_thresholding_ratio, sample_max_value.
    Flow matching keys (use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type) are not SD:
    `unsupported_config`, so a config that turns them on is refused, naming the key.

    Where pare differs from diffusers on purpose (each has a test):
      - ValueError (diffusers goes on, or fails later): num_inference_steps < 1; unknown config values, including
        solver_order 4+ (diffusers runs it as order 3) and prediction_type="flow_prediction"; "leading" spacing past
        T-1 (diffusers clamps the noise level); spacings that repeat a timestep (num_inference_steps near T, h = 0);
        custom timesteps that are not strictly descending or leave [0, T-1]; algorithm_type="sde-dpmsolver" with
        solver_order=3 (diffusers has no such update: UnboundLocalError at the first third-order step); a timestep
        that is not in the schedule (diffusers silently takes the last step); a step after the last one;
        both `generator` and `variance_noise`; `mu` (dynamic shifting is flow matching); use_lu_lambdas together
        with another use_*_sigmas option (diffusers silently lets Karras win).
      - "trailing" never gains diffusers' spurious timestep -1 (its np.arange overshoot, e.g. n = 61 of T = 1000):
        pare takes the n timesteps asked for.
      - variance_type: diffusers keeps output channels [:3] (RGB pixel models; a 4-channel latent model fails with a
        shape error); pare keeps the first `sample.shape[1]`, the same for 3 channels.
      - a last step of zero length in lambda (the Karras / Lu / exponential / beta spacings with final_sigmas_type=
        "sigma_min" end with one; for an SDE, also one an ulp negative) is taken as a first-order ODE step, the
        h -> 0 limit of every update (`degenerate_step`); diffusers returns NaN there for heun, third-order and SDE
        steps, and the same numbers otherwise.
      - a schedule whose first timestep repeats (e.g. cosine betas with Karras / exponential /
        beta sigmas) starts at step 0 (`start_at_first_timestep`); diffusers' second-match rule starts at step 1,
        skips a noise level and fails with an IndexError at the end (unless the pipeline calls set_begin_index(0)).
      - algorithm_type="deis" (a DEIS config) loads as "dpmsolver++": diffusers intends that remapping but then
        raises "final_sigmas_type zero is not supported for algorithm_type deis".
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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        resolve_foreign_values(self)
        check_solver_config(self, ALGORITHM_TYPES)
        owner, c = type(self).__name__, self.config
        check_choice(owner, "variance_type", c.variance_type, VARIANCE_TYPES)
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            raise ValueError(
                f"{owner}: algorithm_type='sde-dpmsolver' has no third-order update (diffusers fails at the first "
                "third-order step): use solver_order=2, or algorithm_type='sde-dpmsolver++'"
            )
        if c.use_lu_lambdas and (c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas):
            # diffusers silently lets use_karras_sigmas win over use_lu_lambdas (and lu over exponential / beta).
            raise ValueError(f"{owner}: use_lu_lambdas=True cannot be combined with another use_*_sigmas option")
        self._build_betas()  # betas, alphas, alphas_cumprod; checks beta_schedule, prediction_type, the sigma options
        if c.rescale_betas_zero_snr:
            # alpha_bar_T = 0 would make sigma_T infinite: diffusers uses float16's smallest subnormal instead.
            self.alphas_cumprod[-1] = 2**-24
        # The VP coefficients of each training timestep (DPM-Solver section 2), float32.
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        # Before set_timesteps: every training timestep, as float32 (diffusers' placeholder).
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0

    # --- timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps (`self.timesteps`, int64) and their noise levels (`self.sigmas`, float32, one more: the end).

        Give `num_inference_steps`, or your own descending `timesteps` (not with the Karras / exponential / beta /
        Lu spacings, which choose their own). `mu` belongs to flow matching's dynamic shifting and is refused.
        """
        c, owner, T = self.config, type(self).__name__, self.config.num_train_timesteps
        if mu is not None:
            raise ValueError(
                f"{owner}.set_timesteps: mu={mu} shifts flow-matching schedules (use_dynamic_shifting), "
                "which pare does not implement"
            )
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps()")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
                if c[flag]:
                    raise ValueError(f"custom timesteps cannot be used with {flag}=True, which chooses its own noise levels")
            timesteps = check_custom_timesteps(timesteps, T).numpy()
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, T)
            timesteps = solver_timesteps(c.timestep_spacing, num_inference_steps, T, c.steps_offset,
                                         last_unclipped_timestep(self))

        # 1. the noise levels: interpolated at the timesteps, or a spacing of its own whose timesteps follow from sigma
        sigmas = train_sigmas(self.alphas_cumprod)  # (T,) ascending, float32
        log_sigmas = np.log(sigmas)
        chosen = None if num_inference_steps is None else convert_sigmas(c, np.flip(sigmas).copy(), num_inference_steps)
        if c.use_lu_lambdas:
            # uniform steps in lambda (DPM-Solver section 3.3); diffusers spaces log sigma = -lambda, the same thing
            lambdas = np.flip(log_sigmas.copy())
            lambda_min, lambda_max = lambdas[-1].item(), lambdas[0].item()
            lambdas = lambda_max + np.linspace(0, 1, num_inference_steps) * (lambda_min - lambda_max)
            chosen = np.exp(lambdas)
        if chosen is not None:
            sigmas = chosen
            timesteps = timesteps_for_sigmas(sigmas, log_sigmas)
            # diffusers rounds the Karras / Lu timesteps except for the cosine schedule; exponential / beta ones
            # are truncated by the int64 cast below.
            if (c.use_karras_sigmas or c.use_lu_lambdas) and c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            if num_inference_steps is not None:
                check_solver_timesteps(timesteps, c.timestep_spacing, num_inference_steps, T, c.steps_offset,
                                       f" (lambda_min_clipped={c.lambda_min_clipped})")
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)

        # 2. the last level: where sampling ends
        sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if c.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))  # (n + 1,), CPU
        self.timesteps = to_device(torch.from_numpy(np.asarray(timesteps)), device, torch.int64)
        self.num_inference_steps = len(self.timesteps)

        # 3. a fresh solver state
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # --- one step

    def _alpha_sigma(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return vp_alpha_sigma(self.sigmas[index])

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 (DPM-Solver++) or eps (DPM-Solver) at the current step, from the model's prediction (see the function)."""
        c = self.config
        if c.variance_type in LEARNED_VARIANCE_TYPES:
            model_output = model_output[:, : sample.shape[1]]  # (B, 2C, ...) -> (B, C, ...): the mean; drop the variance
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        alpha_t, sigma_t = self._alpha_sigma(self.step_index)
        threshold = None
        if c.thresholding:
            def threshold(x0):
                return threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return convert_model_output(model_output, sample, alpha_t, sigma_t, c.prediction_type,
                                    c.algorithm_type in DATA_PREDICTION_TYPES, threshold)

    def order_of_step(self, i: int, n: int) -> int:
        """The order of step i of n, given the steps taken so far (`lower_order_nums`): the lowest of solver_order;
        one more than the steps taken (a multistep method has no history at first); 1 at the last step
        (euler_at_final, lower_order_final with < 15 steps, or final_sigmas_type="zero", where sigma = 0 has no
        lambda); 2 at the second to last (lower_order_final, < 15). 0: a step of zero length in lambda
        (`degenerate_step`), taken as a first-order ODE step."""
        c = self.config
        if degenerate_step(c.algorithm_type, *self._alpha_sigma(i + 1), *self._alpha_sigma(i)):
            return 0
        lower_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            return 2
        return 3

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver step from sigmas[i] to sigmas[i + 1], i = `step_index`, of `order_of_step`'s order.
        SDE types draw their noise z from `generator` (float32, as diffusers draws it) unless `variance_noise` is given.
        """
        c = self.config
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to step(), not both: each is a source of the noise")
        i, n = self._start_step(timestep)

        # 1. the order of this step (lower orders at the end stabilise sampling with few steps)
        order = self.order_of_step(i, n)

        # 2. the model output as the solver's x_0 or eps, added to the history (newest last)
        model_output = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]

        # 3. float32 for the update, as diffusers does (half-precision sigma ratios lose the small steps); SDE noise z
        sample = sample.to(torch.float32)
        noise = None
        if c.algorithm_type in SDE_TYPES:
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)

        # 4. x_{t_i} -> x_{t_{i+1}}: first (eq. 3.7 / DPM-Solver++ 4.1), second (Algorithm 2) or third order
        (alpha_t, sigma_t), (alpha_s, sigma_s) = self._alpha_sigma(i + 1), self._alpha_sigma(i)
        if order == 0:
            prev_sample = first_order_update(ode_type(c.algorithm_type), sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s)
        elif order == 1:
            prev_sample = first_order_update(c.algorithm_type, sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s, noise)
        elif order == 2:
            alphas, sigmas = zip(*(self._alpha_sigma(j) for j in (i + 1, i, i - 1)))
            prev_sample = multistep_second_order_update(
                c.algorithm_type, c.solver_type, sample, self.model_outputs, alphas, sigmas, noise
            )
        else:
            alphas, sigmas = zip(*(self._alpha_sigma(j) for j in (i + 1, i, i - 1, i - 2)))
            prev_sample = multistep_third_order_update(c.algorithm_type, sample, self.model_outputs, alphas, sigmas, noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1

        # 5. back to the model's dtype; the next step
        prev_sample = prev_sample.to(model_output.dtype)
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
