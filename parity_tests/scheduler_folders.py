"""Pipeline folders that name the schedulers real checkpoints ship, for the pipeline and CLI tests.

The scheduler configs below are modelled on the `scheduler/scheduler_config.json` of well-known
Hub folders: their class, their values, and the keys left over from other classes that they
carry (SDXL's Euler config holds PNDM's `skip_prk_steps` and DDIM's `set_alpha_to_one`). The tiny
pipeline folder (`tiny_components.pipeline_folder`) is copied and its scheduler replaced, in
both `model_index.json` and `scheduler_config.json`, as such a folder names it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .tiny_components import pipeline_folder

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "trained_betas": None}

SHIPPED_SCHEDULERS = {
    # Stable Diffusion 1.5: PLMS.
    "sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD_BETAS, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False},
    # SDXL base 1.0: Euler, with PNDM's and DDIM's keys left over.
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", **SD_BETAS,
             "clip_sample": False, "interpolation_type": "linear", "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "use_karras_sigmas": False},
    # SDXL-Turbo: Euler a on trailing timesteps.
    "sdxl-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", **SD_BETAS,
                   "clip_sample": False, "interpolation_type": "linear", "prediction_type": "epsilon",
                   "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                   "timestep_spacing": "trailing", "use_karras_sigmas": False},
    # Playground v2.5: DPM-Solver++ on EDM sigmas.
    "playground-v2.5": {"_class_name": "EDMDPMSolverMultistepScheduler", "_diffusers_version": "0.27.0.dev0",
                        "algorithm_type": "dpmsolver++", "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
                        "final_sigmas_type": "zero", "lower_order_final": True, "num_train_timesteps": 1000,
                        "prediction_type": "epsilon", "rho": 7.0, "sample_max_value": 1.0, "sigma_data": 0.5,
                        "sigma_max": 80.0, "sigma_min": 0.002, "solver_order": 2, "solver_type": "midpoint",
                        "thresholding": False},
    # A fine-tune shipping DPM++ 2M Karras, with DDIM's and PNDM's keys left over.
    "dpmpp-2m-karras-finetune": {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.21.0",
                                 **SD_BETAS, "algorithm_type": "dpmsolver++", "clip_sample": False,
                                 "dynamic_thresholding_ratio": 0.995, "lower_order_final": True,
                                 "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
                                 "skip_prk_steps": True, "solver_order": 2, "solver_type": "midpoint",
                                 "steps_offset": 1, "thresholding": False, "use_karras_sigmas": True},
    # LCM Dreamshaper v7: the LCM schedule, for a UNet with time_cond_proj_dim.
    "lcm": {"_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", **SD_BETAS, "clip_sample": False,
            "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "original_inference_steps": 50,
            "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
            "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
            "timestep_spacing": "leading"},
}


def name_scheduler(folder: Path, config: dict) -> Path:
    """Make the pipeline folder name `config`'s scheduler class, with that config, as a shipped folder does."""
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    return folder


def folder_with_scheduler(family: str, shipped: str, dest: Path) -> Path:
    """A copy of the tiny `family` folder (tiny-sd, tiny-sdxl) naming the scheduler of SHIPPED_SCHEDULERS[shipped]."""
    return name_scheduler(shutil.copytree(pipeline_folder(family), dest), SHIPPED_SCHEDULERS[shipped])
