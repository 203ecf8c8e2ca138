"""pare's models: the blocks of Stable Diffusion, named and laid out as in diffusers."""

from .modeling import ModelMixin

__all__ = ["ModelMixin"]
