"""Condition images and masks in: resized to the generation size, kept in [0, 1] (not [-1, 1]).

diffusers twin: `image_processor.py` (`VaeImageProcessor.preprocess` with `do_normalize=False`,
as ControlNet pipelines build their `control_image_processor`, and with `do_binarize=True,
do_convert_grayscale=True`, as inpainting pipelines build their `mask_processor`).
`pipeline_utils.preprocess_image` is the [-1, 1] version for the images the VAE encodes.
"""

from __future__ import annotations

import numpy as np
import torch


def image_tensor(image, vae_scale_factor: int, height: int | None = None, width: int | None = None,
                 grayscale: bool = False, resample: str = "lanczos") -> torch.Tensor:
    """PIL / numpy / torch image(s) -> (B, C, H, W) float32 in [0, 1], resized to (height, width).

    height / width default to the image's own, cut down to a multiple of `vae_scale_factor`.
    PIL images are resized with `resample` ("lanczos", or "bicubic" as the x4 upscaler's processor
    does; made RGB, or L with `grayscale`); arrays ((H, W[, C]) or
    (B, H, W[, C])) and tensors ((C, H, W) or (B, C, H, W)) with nearest interpolation, as diffusers does.
    """
    import PIL.Image

    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in images):
        raise ValueError(f"expected a PIL image, a numpy array or a torch tensor (or a non-empty list of them), "
                         f"not {type(image).__name__}")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        own_h, own_w = first.height, first.width
    elif isinstance(first, torch.Tensor):
        own_h, own_w = first.shape[-2:]
    else:
        own_h, own_w = (first.shape[1:3] if first.ndim == 4 else first.shape[:2])
    height, width = (side - side % vae_scale_factor for side in (height or own_h, width or own_w))

    if isinstance(first, PIL.Image.Image):
        mode = "L" if grayscale else "RGB"
        method = {"lanczos": PIL.Image.LANCZOS, "bicubic": PIL.Image.BICUBIC}[resample]
        images = [i.resize((width, height), resample=method) for i in images]
        images = [i if i.mode == mode else i.convert(mode) for i in images]
        array = np.stack([np.array(i).astype(np.float32) / 255.0 for i in images])  # (B, H, W[, 3])
        array = array[..., None] if array.ndim == 3 else array
        return torch.from_numpy(array.transpose(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
    if isinstance(first, np.ndarray):
        array = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        array = array[..., None] if array.ndim == 3 else array  # (B, H, W) -> (B, H, W, 1)
        pixels = torch.from_numpy(array.astype(np.float32).transpose(0, 3, 1, 2))  # (B, C, H, W)
    else:
        pixels = torch.cat(images) if first.ndim == 4 else torch.stack(images)  # (B, C, H, W)
        pixels = pixels.float()
    return torch.nn.functional.interpolate(pixels, size=(height, width))


def preprocess_control_image(image, vae_scale_factor: int, height: int | None = None,
                             width: int | None = None) -> torch.Tensor:
    """A ControlNet's condition image: (B, 3, H, W) in [0, 1] (diffusers' control_image_processor)."""
    return image_tensor(image, vae_scale_factor, height, width)


def preprocess_mask(mask, vae_scale_factor: int, height: int, width: int) -> torch.Tensor:
    """An inpainting mask: (B, 1, H, W) of 0 (keep) and 1 (repaint), thresholded at 0.5 (diffusers' mask_processor)."""
    pixels = image_tensor(mask, vae_scale_factor, height, width, grayscale=True)
    if pixels.shape[1] != 1:  # an RGB array or tensor: diffusers takes its first channel too
        pixels = pixels[:, :1]
    return (pixels >= 0.5).to(pixels.dtype)
