"""LoRA for pare's pipelines: the formats people have (formats.py), adapters as forward hooks beside the
modules (layers.py), and diffusers' pipeline methods (mixin.py). Nothing here imports diffusers."""

from .formats import LoRAWeights, read_lora
from .mixin import LoraLoaderMixin

__all__ = ["LoRAWeights", "LoraLoaderMixin", "read_lora"]
