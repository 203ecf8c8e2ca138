"""DPM-Solver++ (multistep) in the EDM formulation: x = x_0 + sigma eps, with Karras' preconditioning.

diffusers twin: `schedulers/scheduling_edm_dpmsolver_multistep.py` (`EDMDPMSolverMultistepScheduler`), the scheduler
of Playground v2.5 and of SDXL-EDM checkpoints such as CosXL.
Sources: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364
(Table 1: the sigma schedule, eq. 5, and the preconditioning c_skip, c_out, c_in, c_noise; section 5);
Lu et al., DPM-Solver++, arXiv 2211.01095 (Algorithm 2, "2M"), with the functions of `scheduling_dpmsolver_multistep.py`.

In EDM's variance-exploding form alpha_t = 1 and sigma_t = sigma (the model's input is scaled by c_in instead),
so lambda_t = -log(sigma) and the DPM-Solver++ updates need no other change.
"""

from __future__ import annotations

import numbers

import torch

from ..configuration import ConfigMixin, register_to_config
from .scheduling_dpmsolver_multistep import (
    DATA_PREDICTION_TYPES,
    check_solver_config,
    degenerate_step,
    first_order_update,
    multistep_second_order_update,
    multistep_third_order_update,
    ode_type,
    resolve_foreign_values,
)
from .scheduling_edm_euler import PREDICTION_TYPES as EDM_PREDICTION_TYPES
from .scheduling_edm_euler import SIGMA_SCHEDULES, EDMEulerScheduler
from .scheduling_utils import Generator, SchedulerOutput, check_choice, randn_tensor, threshold_sample
from .sigmas import SigmaSchedulerMixin


class EDMDPMSolverMultistepScheduler(SigmaSchedulerMixin, ConfigMixin):
    """Multistep DPM-Solver++ (arXiv 2211.01095) on EDM's sigmas and preconditioning (Karras et al., arXiv 2206.00364).

    diffusers twin: `schedulers/scheduling_edm_dpmsolver_multistep.py EDMDPMSolverMultistepScheduler`; same config
    keys, defaults and numbers (verified by `parity_tests/test_scheduling_edm_dpmsolver_multistep.py`).

    Config (diffusers' names and defaults): sigma_min, sigma_max, sigma_data (EDM's sigma_data = 0.5),
    sigma_schedule ("karras": eq. 5 with `rho`; "exponential"), num_train_timesteps (only `len()`),
    prediction_type ("epsilon", "v_prediction"), solver_order (1-3), algorithm_type ("dpmsolver++",
    "sde-dpmsolver++"), solver_type, lower_order_final, euler_at_final, final_sigmas_type, thresholding,
    dynamic_thresholding_ratio, sample_max_value.

    The model sees c_in * x (`scale_model_input`) and the timestep c_noise = log(sigma) / 4 (`timesteps` are these
    floats); its output F becomes x_0 = c_skip x + c_out F (`precondition_outputs`, Table 1).

    Where pare differs from diffusers on purpose (each has a test):
      - ValueError at construction for a sigma_min, sigma_max, sigma_data or rho that is not a number (an Euler
        config's sigma_min=None: diffusers' TypeError), for prediction_type="sample" (diffusers accepts it and
        fails in the first step) and for algorithm_type="sde-dpmsolver++" with solver_order=3 (diffusers has no
        such update: UnboundLocalError at the first third-order step).
      - ValueError for num_inference_steps < 1, a timestep not in the schedule (diffusers silently takes the
        last step) and a step after the last one.
      - a last step of zero length in lambda (final_sigmas_type="sigma_min" repeats the last level) is taken as
        a first-order ODE step, where diffusers' heun, third-order and SDE updates return NaN (`degenerate_step`).
    """

    config_name = "scheduler_config.json"
    order = 1
    start_at_first_timestep = True  # see SigmaSchedulerMixin._init_step_index

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        owner = type(self).__name__
        resolve_foreign_values(self)
        check_solver_config(self, DATA_PREDICTION_TYPES)
        c = self.config
        check_choice(owner, "sigma_schedule", c.sigma_schedule, SIGMA_SCHEDULES)
        check_choice(owner, "prediction_type", c.prediction_type, EDM_PREDICTION_TYPES)
        if c.algorithm_type == "sde-dpmsolver++" and c.solver_order == 3:
            raise ValueError(
                f"{owner}: algorithm_type='sde-dpmsolver++' has no third-order update here (diffusers fails at the "
                "first third-order step): use solver_order=2, or algorithm_type='dpmsolver++'"
            )
        for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data), ("rho", rho)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                # e.g. an EulerDiscreteScheduler config's sigma_min=None (diffusers: a TypeError in the sigma formula)
                raise ValueError(f"{owner}: {key} must be a number, got {value!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"{owner}: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        sigmas = self._compute_sigmas(torch.linspace(0, 1, num_train_timesteps))
        self.timesteps = self.precondition_noise(sigmas)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.num_inference_steps = None
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # EDM's preconditioning (Karras et al., Table 1), c_noise as the timesteps, and the sigma schedule (eq. 5, or
    # log-even levels): written once, in EDMEulerScheduler, whose diffusers twin has the same methods.
    init_noise_sigma = EDMEulerScheduler.init_noise_sigma  # sqrt(sigma_max^2 + 1), as diffusers has it
    precondition_inputs = EDMEulerScheduler.precondition_inputs  # c_in x
    precondition_noise = EDMEulerScheduler.precondition_noise  # c_noise = log(sigma) / 4
    precondition_outputs = EDMEulerScheduler.precondition_outputs  # x_0 = c_skip x + c_out F
    scale_model_input = EDMEulerScheduler.scale_model_input  # c_in x at the current step (starts the step index)
    _compute_sigmas = EDMEulerScheduler._sigmas_from_ramp  # ramp in [0, 1] -> sigma_max .. sigma_min

    # --- timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """`num_inference_steps` EDM levels from sigma_max to sigma_min (float32), then 0 or sigma_min; timesteps = c_noise."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        sigmas = self._compute_sigmas(torch.linspace(0, 1, num_inference_steps)).to(dtype=torch.float32, device=device)
        self.timesteps = self.precondition_noise(sigmas)
        sigma_last = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.cat([sigmas, torch.tensor([sigma_last], dtype=torch.float32, device=device)]).to("cpu")
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    # --- one step

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x_0 from the preconditioned model output (then thresholded, if asked)."""
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}")
        x0_pred = self.precondition_outputs(sample, model_output, self.sigmas[self.step_index])
        if self.config.thresholding:
            x0_pred = threshold_sample(x0_pred, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0_pred

    def _alpha_sigma(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Inputs are scaled by c_in before the model, so the solver sees alpha_t = 1, sigma_t = sigma.
        return torch.tensor(1.0), self.sigmas[index]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver++ step from sigmas[i] to sigmas[i + 1] (the order rule of the VP twin).

        Unlike the VP twin, the update runs in the sample's dtype, and sde-dpmsolver++ draws its noise from
        `generator` in the model output's dtype, as diffusers does.
        """
        c = self.config
        i, n = self._start_step(timestep)

        # 1. the order of this step
        lower_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and c.lower_order_final and n < 15

        # 2. x_0 from the model output, added to the history (newest last); the SDE's noise
        model_output = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)

        # 3. the DPM-Solver++ update of that order (first-order ODE for a step of zero length: `degenerate_step`)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = self._alpha_sigma(i + 1), self._alpha_sigma(i)
        if degenerate_step(c.algorithm_type, alpha_t, sigma_t, alpha_s, sigma_s):
            prev_sample = first_order_update(ode_type(c.algorithm_type), sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s)
        elif c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = first_order_update(c.algorithm_type, sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s, noise)
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            alphas, sigmas = zip(*(self._alpha_sigma(j) for j in (i + 1, i, i - 1)))
            prev_sample = multistep_second_order_update(
                c.algorithm_type, c.solver_type, sample, self.model_outputs, alphas, sigmas, noise
            )
        else:
            alphas, sigmas = zip(*(self._alpha_sigma(j) for j in (i + 1, i, i - 1, i - 2)))
            prev_sample = multistep_third_order_update(c.algorithm_type, sample, self.model_outputs, alphas, sigmas)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
