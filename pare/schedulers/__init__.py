"""Schedulers: given the model's prediction at timestep t, where does the sample go next?

    schedule.py                              beta schedules, zero terminal SNR, timestep spacing (shared by all)
    sigmas.py                                Karras / exponential / beta sigma schedules (the k-diffusion family)
    scheduling_utils.py                      the base class: config checks, add_noise, get_velocity, thresholding
    scheduling_ddim.py                       DDIMScheduler                    Song et al., arXiv 2010.02502
    scheduling_ddpm.py                       DDPMScheduler                    Ho et al., arXiv 2006.11239
    scheduling_pndm.py                       PNDMScheduler (PLMS)             Liu et al., arXiv 2202.09778
    scheduling_euler_discrete.py             EulerDiscreteScheduler           Karras et al., arXiv 2206.00364
    scheduling_euler_ancestral_discrete.py   EulerAncestralDiscreteScheduler  k-diffusion's ancestral Euler
    scheduling_heun_discrete.py              HeunDiscreteScheduler            arXiv 2206.00364, Algorithm 1
    scheduling_k_dpm_2_discrete.py           KDPM2DiscreteScheduler           arXiv 2206.00364 (DPM-Solver-2)
    scheduling_k_dpm_2_ancestral_discrete.py KDPM2AncestralDiscreteScheduler  its ancestral variant
    scheduling_lms_discrete.py               LMSDiscreteScheduler             linear multistep
    scheduling_dpmsolver_multistep.py        DPMSolverMultistepScheduler      arXiv 2206.00927, 2211.01095
    scheduling_dpmsolver_singlestep.py       DPMSolverSinglestepScheduler     arXiv 2206.00927, 2211.01095
    scheduling_unipc_multistep.py            UniPCMultistepScheduler          Zhao et al., arXiv 2302.04867
    scheduling_deis_multistep.py             DEISMultistepScheduler           Zhang & Chen, arXiv 2204.13902
    scheduling_lcm.py                        LCMScheduler                     Luo et al., arXiv 2310.04378
    scheduling_edm_euler.py                  EDMEulerScheduler                arXiv 2206.00364 (EDM sigmas)
    scheduling_edm_dpmsolver_multistep.py    EDMDPMSolverMultistepScheduler   DPM-Solver++ on EDM sigmas
    samplers.py                              web-UI sampler names ("Euler a", "DPM++ 2M Karras") -> class + options

diffusers twin: `diffusers/schedulers/`. A pipeline's `model_index.json` (and its
`scheduler/scheduler_config.json`) names the scheduler class in `_class_name`; `get_scheduler_class`
resolves that name here.

The registry is a table of names -> module files, read lazily: `import pare.schedulers` imports
no scheduler, and a class is imported the first time it is asked for (`SCHEDULERS[name]`,
`get_scheduler_class(name)`, `pare.schedulers.EulerDiscreteScheduler`). `SCHEDULERS` lists the
registered names whose module file is present.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping

from .scheduling_utils import DiscreteScheduler, SchedulerOutput

# diffusers class name -> the module of this package that defines it (the diffusers file's name).
SCHEDULER_MODULES: dict[str, str] = {
    "DDIMScheduler": "scheduling_ddim",
    "DDPMScheduler": "scheduling_ddpm",
    "PNDMScheduler": "scheduling_pndm",
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "HeunDiscreteScheduler": "scheduling_heun_discrete",
    "KDPM2DiscreteScheduler": "scheduling_k_dpm_2_discrete",
    "KDPM2AncestralDiscreteScheduler": "scheduling_k_dpm_2_ancestral_discrete",
    "LMSDiscreteScheduler": "scheduling_lms_discrete",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "scheduling_dpmsolver_singlestep",
    "UniPCMultistepScheduler": "scheduling_unipc_multistep",
    "DEISMultistepScheduler": "scheduling_deis_multistep",
    "LCMScheduler": "scheduling_lcm",
    "EDMEulerScheduler": "scheduling_edm_euler",
    "EDMDPMSolverMultistepScheduler": "scheduling_edm_dpmsolver_multistep",
}


def module_present(name: str) -> bool:
    """Whether the module file of the registered scheduler `name` exists (without importing it)."""
    return importlib.util.find_spec(f"{__name__}.{SCHEDULER_MODULES[name]}") is not None


def get_scheduler_class(name: str) -> type:
    """The pare class for a diffusers scheduler name (a config's `_class_name`)."""
    if name not in SCHEDULER_MODULES:
        raise ValueError(f"scheduler {name!r} is not implemented in pare; known schedulers: {sorted(SCHEDULERS)}")
    module = SCHEDULER_MODULES[name]
    if not module_present(name):
        raise ValueError(f"scheduler {name!r} is registered, but its module pare/schedulers/{module}.py is missing")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


class _Registry(Mapping):
    """name -> class, resolved on lookup; iterates over the names whose module is present."""

    def __getitem__(self, name: str) -> type:
        if name not in SCHEDULER_MODULES or not module_present(name):
            raise KeyError(name)
        return get_scheduler_class(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name in SCHEDULER_MODULES if module_present(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        return name in SCHEDULER_MODULES and module_present(name)

    def __repr__(self) -> str:
        return f"SCHEDULERS({', '.join(self)})"


SCHEDULERS: Mapping[str, type] = _Registry()


def __getattr__(name: str):
    # `from pare.schedulers import EulerDiscreteScheduler` imports that one module, on first use.
    if name in SCHEDULER_MODULES:
        return get_scheduler_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *SCHEDULERS])


__all__ = ["DiscreteScheduler", "SchedulerOutput", "SCHEDULERS", "SCHEDULER_MODULES", "get_scheduler_class",
           *SCHEDULERS]
