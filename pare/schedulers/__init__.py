"""Schedulers: given the model's prediction at timestep t, where does the sample go next?

    schedule.py          beta schedules, zero terminal SNR, timestep spacing (shared by all)
    scheduling_utils.py  the base class: config checks, add_noise, get_velocity, x_0 prediction, thresholding
    scheduling_ddim.py   DDIMScheduler  (Song et al., arXiv 2010.02502)
    scheduling_ddpm.py   DDPMScheduler  (Ho et al., arXiv 2006.11239)

diffusers twin: `diffusers/schedulers/`. A pipeline's `scheduler/scheduler_config.json` names
its class in `_class_name`; `get_scheduler_class` resolves that name here.
"""

from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_utils import DiscreteScheduler, SchedulerOutput

SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "DDPMScheduler": DDPMScheduler,
}


def get_scheduler_class(name: str) -> type[DiscreteScheduler]:
    """The pare class for a diffusers scheduler name (a config's `_class_name`)."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"scheduler {name!r} is not implemented in pare; known schedulers: {sorted(SCHEDULERS)}") from None


__all__ = ["DDIMScheduler", "DDPMScheduler", "DiscreteScheduler", "SchedulerOutput", "SCHEDULERS", "get_scheduler_class"]
