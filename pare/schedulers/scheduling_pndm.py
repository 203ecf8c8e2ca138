"""PNDM: pseudo numerical methods on the DDIM manifold; PLMS is what Stable Diffusion 1.x ships.

diffusers twin: `schedulers/scheduling_pndm.py` (`PNDMScheduler`).
Source: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
arXiv 2202.09778: the transfer part phi (eq. 9), the pseudo Runge-Kutta (PRK) warm-up and the
pseudo linear multistep (PLMS) update (eqs. 12 and 13, Algorithm 2: F-PNDM). With
`skip_prk_steps=True` the warm-up is instead crowsonkb's PLMS sampler for latent diffusion
(github.com/CompVis/latent-diffusion/pull/51): one Euler step redone as pseudo improved Euler
(Heun), then Adams-Bashforth of order 2, 3 and finally 4.

The model is evaluated once per entry of `timesteps`; the scheduler decides from its `counter`
which part of the method that evaluation feeds. `ets` holds the model outputs eps_theta the
multistep formula combines (the newest last).
"""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from .schedule import spaced_timesteps
from .scheduling_utils import DiscreteScheduler, SchedulerOutput, check_choice, to_device

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(DiscreteScheduler):
    """PNDM sampling, Liu et al. (arXiv 2202.09778): F-PNDM (Algorithm 2), or PLMS alone with `skip_prk_steps`.

    diffusers twin: `schedulers/scheduling_pndm.py PNDMScheduler`; same config keys, defaults,
    timesteps, state (`ets`, `counter`, `cur_sample`, `cur_model_output`) and numbers (verified by
    `parity_tests/test_scheduling_pndm.py`).

    Config (diffusers' names and defaults):
        num_train_timesteps, beta_start, beta_end, beta_schedule ("linear", "scaled_linear",
        "squaredcos_cap_v2"), trained_betas: the beta schedule (`schedule.make_betas`).
        skip_prk_steps: False: three pseudo Runge-Kutta steps (4 model evaluations each) start
            the multistep method, as in the paper; True: the PLMS warm-up of latent diffusion
            (Stable Diffusion 1.x's configs set True).
        set_alpha_to_one: alpha_bar "after" the last step is 1 (True) or alpha_bar_0 (False, the default).
        steps_offset, timestep_spacing: which timesteps sampling visits (`schedule.spaced_timesteps`).
        prediction_type: "epsilon" or "v_prediction".

    Kept from diffusers for parity: every multistep step moves by T // n timesteps, the stride of
    "leading" spacing, whatever the spacing (as in DDIM, diffusers issue #12633), so with
    "trailing" / "linspace" the alpha_bar used for t - delta can differ from the next visited
    timestep's; and the PRK half step is T // n // 2 from the current timestep, which for an odd
    stride is not the half-way timestep the next evaluation is made at.

    Where pare differs from diffusers on purpose (all raise a ValueError where diffusers goes on or
    fails obscurely): num_inference_steps of 0 or below, or below 4 with the Runge-Kutta warm-up
    (diffusers: a numpy broadcasting error); "leading" timesteps past T-1; prediction_type "sample"
    (diffusers raises only inside step()); unknown config values (diffusers raises only for
    beta_schedule). "trailing" spacing never gains diffusers' spurious extra timestep -1, which
    diffusers visits last and reads as alphas_cumprod[-1], the noisiest level (see `spaced_timesteps`).
    """

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    pndm_order = 4  # the multistep method's order: PLMS combines 4 model outputs (eq. 13)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        check_choice(type(self).__name__, "prediction_type", prediction_type, PNDM_PREDICTION_TYPES)
        self._build_schedule()
        # alpha_bar of the step after the last one: 1 means "fully denoised".
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None  # as in diffusers: no schedule until set_timesteps()
        self._reset_state()

    def _reset_state(self) -> None:
        self.ets: list[torch.Tensor] = []  # eps_theta at the start of each step, newest last
        self.counter = 0  # model evaluations consumed since set_timesteps()
        self.cur_model_output = 0  # the running Runge-Kutta sum of eq. 12
        self.cur_sample = None  # x_t at the start of the current (Runge-Kutta or Heun) step

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the timesteps to evaluate the model at (`self.timesteps`, int64): PRK ones first, then PLMS ones.

        With the Runge-Kutta warm-up, n steps take n + 9 evaluations: 3 PRK steps of 4 (at t, t - delta/2
        twice, t - delta), then one per PLMS step. With `skip_prk_steps`, n + 1: the second timestep is
        visited twice (the Euler step, then its Heun correction).
        """
        c = self.config
        spaced = spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        n = int(num_inference_steps)
        if not c.skip_prk_steps and n < self.pndm_order:
            raise ValueError(
                f"PNDMScheduler: num_inference_steps={n} is too few for the Runge-Kutta warm-up (skip_prk_steps=False), "
                f"which takes {self.pndm_order - 1} steps before the first multistep one: use num_inference_steps >= "
                f"{self.pndm_order}, or skip_prk_steps=True"
            )
        self.num_inference_steps = n
        ascending = spaced.numpy()[::-1]  # t_0 < t_1 < ... < t_{n-1}: diffusers' `_timesteps`
        self._timesteps = ascending.copy()

        if c.skip_prk_steps:
            # t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0: the first step is evaluated twice at its end (Heun)
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            # Three Runge-Kutta steps over the last four timesteps: for each, evaluations at t, t - h, t - h, t - 2h
            # with h = (T // n) // 2, written as the (t, t + h) pairs of the ends, doubled, and trimmed.
            half = c.num_train_timesteps // n // 2
            last = ascending[-self.pndm_order:]  # (4,)
            pairs = last.repeat(2) + np.tile(np.array([0, half]), self.pndm_order)  # (8,): t_a, t_a + h, t_b, ...
            self.prk_timesteps = pairs[:-1].repeat(2)[1:-1][::-1].copy()  # (12,), descending
            self.plms_timesteps = ascending[:-3][::-1].copy()  # the PLMS steps start where the warm-up ends

        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = to_device(torch.from_numpy(timesteps), device)
        self._reset_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One model evaluation's worth of PNDM: a Runge-Kutta stage while the warm-up lasts, else a PLMS step."""
        if not self.config.skip_prk_steps and self.prk_timesteps is not None and self.counter < len(self.prk_timesteps):
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def _check_ready(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        if self.num_inference_steps is None:
            raise ValueError(
                "PNDMScheduler.step() was called before set_timesteps(): call "
                "scheduler.set_timesteps(num_inference_steps) first, it fixes the step size"
            )
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")

    def step_prk(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One stage of a pseudo Runge-Kutta step from t to t - delta (Liu et al., eq. 12).

            e_1 = eps(x_t, t)                      x_1 = phi(x_t, e_1, t, t - delta/2)
            e_2 = eps(x_1, t - delta/2)            x_2 = phi(x_t, e_2, t, t - delta/2)
            e_3 = eps(x_2, t - delta/2)            x_3 = phi(x_t, e_3, t, t - delta)
            e_4 = eps(x_3, t - delta)              e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6
            x_{t-delta} = phi(x_t, e', t, t - delta)

        `counter % 4` says which stage this evaluation is; e_1 of each step joins `ets` for PLMS.
        """
        # Notation: delta -> T // n (diffusers' stride); half step -> T // n // 2
        self._check_ready(model_output, sample)
        stage = self.counter % 4

        # 1. where this stage lands: a half step after stages 1 and 3 (counter even), none after 2 and 4
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = self._host_int(timestep) - diff_to_prev
        # 2. every stage starts from x_t of its Runge-Kutta step
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        # 3. accumulate e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6, stage by stage
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage == 1:
            self.cur_model_output += 1 / 3 * model_output
        elif stage == 2:
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        # 4. transfer from x_t with this stage's eps (eq. 9)
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1

        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample)

    def step_plms(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One pseudo linear multistep step t -> t - delta (Liu et al., eq. 13): Adams-Bashforth on eps.

            e' = (55 e_t - 59 e_{t-delta} + 37 e_{t-2 delta} - 9 e_{t-3 delta}) / 24,   x_{t-delta} = phi(x_t, e', t, t - delta)

        With `skip_prk_steps` the first steps have fewer past outputs and use lower orders:
        counter 0: Euler, e' = e_t (and x_t is kept); counter 1: the same step redone with
        e' = (e_t + e_{t-delta}) / 2, the model's output at its end (pseudo improved Euler);
        then e' = (3 e_0 - e_1) / 2 and (23 e_0 - 16 e_1 + 5 e_2) / 12 (Adams-Bashforth 2 and 3).
        """
        # Notation: ets[-1] -> e_t (newest), ets[-2] -> e_{t-delta}, ...; delta -> T // n (diffusers' stride)
        self._check_ready(model_output, sample)
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                "PNDMScheduler.step_plms() needs the 3 Runge-Kutta warm-up steps first (12 step_prk() calls, "
                f"or step() with skip_prk_steps=False); it has {len(self.ets)} of them"
            )
        stride = self.config.num_train_timesteps // self.num_inference_steps
        timestep = self._host_int(timestep)

        # 1. the step's ends, t and t - delta; the Heun correction (counter 1) redoes the first step
        prev_timestep = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + stride

        # 2. e' from the past model outputs, at the highest order they allow
        if len(self.ets) == 1 and self.counter == 0:  # Euler; keep x_t for the correction
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:  # pseudo improved Euler from the kept x_t
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:  # eq. 13
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])

        # 3. transfer (eq. 9)
        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1

        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample)

    def _get_prev_sample(
        self, sample: torch.Tensor, timestep: int, prev_timestep: int, model_output: torch.Tensor
    ) -> torch.Tensor:
        """The transfer part phi(x_t, eps, t, t - delta) of Liu et al., eq. 9 (DDIM's step, rearranged):

            x_{t-delta} = sqrt(a_{t-delta} / a_t) x_t
                          - (a_{t-delta} - a_t) / (sqrt(a_t) (sqrt((1 - a_{t-delta}) a_t) + sqrt((1 - a_t) a_{t-delta}))) eps

        with a = alpha_bar. A v-prediction output is first turned into eps = sqrt(a_t) v + sqrt(1 - a_t) x_t.
        """
        # Notation: alpha_prod_t -> a_t = alpha_bar_t; alpha_prod_t_prev -> a_{t-delta} (final_alpha_cumprod past the end)
        t = self._check_timestep(timestep)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample

        # (a_{t-delta} - a_t) / (sqrt(a_t) (sqrt(a_t) + sqrt(a_{t-delta}))) + 1 simplifies to sqrt(a_{t-delta} / a_t)
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        # eq. 9's denominator of eps, multiplied out: a_t sqrt(1 - a_{t-delta}) + sqrt(a_t (1 - a_t) a_{t-delta})
        model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** (0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
