"""Single-file checkpoints in Stability's original layout, and LoRA weights, read into pare's models.

    families.py      which family a file is (SD 1.x, 2.x, inpainting, SDXL base / refiner), what it may carry
    keymap.py        the engine that reads a key-map table, and the named reshapes
    unet_map.py      LDM UNetModel  (model.diffusion_model.*)   <-> diffusers UNet2DConditionModel
    vae_map.py       LDM AutoencoderKL (first_stage_model.*)    <-> diffusers AutoencoderKL
    clip_map.py      OpenAI CLIP / OpenCLIP (cond_stage_model.*, conditioner.embedders.*) <-> transformers CLIP
    loader.py        read, recognise, convert strictly, build: `from_single_file` of models and pipelines
    save.py          `save_single_file`: the inverse

diffusers twin: `loaders/single_file*.py`. Nothing here imports diffusers.
"""

from .errors import SingleFileError
from .families import FAMILIES, detect_family
from .loader import model_from_single_file, pipeline_from_single_file, read_checkpoint
from .save import save_single_file

__all__ = ["FAMILIES", "SingleFileError", "detect_family", "model_from_single_file", "pipeline_from_single_file",
           "read_checkpoint", "save_single_file"]
