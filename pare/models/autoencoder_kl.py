"""`AutoencoderKL`: Stable Diffusion's VAE, images <-> latents.

diffusers twin: `models/autoencoders/autoencoder_kl.py` (`AutoencoderKL`), with `enable_tiling`
and friends from `models/autoencoders/vae.py` (`AutoencoderMixin`).
Source: the KL-regularised autoencoder of latent diffusion (Rombach et al., arXiv 2112.10752,
sec. 3; the latent scaling of sec. 4.3.2 and appendix D.1).

Where pare's API differs from diffusers' on purpose:
- `encode(x)` returns the `DiagonalGaussianDistribution` itself, not an `AutoencoderKLOutput`
  holding it (`.latent_dist`); `decode(z)` and `forward()` return the image tensor, not a
  `DecoderOutput` (`.sample`). There is no `return_dict`.
- `encode_safely` / `decode_safely` fold in what diffusers' SDXL pipelines do around the VAE
  (run in float32 when `force_upcast` says fp16 overflows) and check the result is finite.
  `docs/vae.md` explains the rules.
- `tiled_encode` returns the moments tensor, as diffusers' `_tiled_encode` does (diffusers'
  public `tiled_encode`, returning a distribution, is deprecated in favour of that form).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ..configuration import register_to_config
from .modeling import ModelMixin
from .vae import Decoder, DiagonalGaussianDistribution, Encoder

logger = logging.getLogger("pare")

FULL_PRECISION = (torch.float32, torch.float64)


class AutoencoderKL(ModelMixin):
    """encoder -> quant_conv -> N(mean, var) ~> z -> post_quant_conv -> decoder.

    Every config key of diffusers' class is accepted with diffusers' default. `scaling_factor`,
    `shift_factor`, `latents_mean` and `latents_std` are data for the pipelines (see
    `scale_latents`); `force_upcast` is read by `encode_safely` / `decode_safely`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=True,  # mean and log-variance
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        # 1x1 convs on the moments and on the latent: a leftover of LDM's VQ variant that KL checkpoints keep.
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        # Tiles of sample_size pixels (latent_size latents), overlapping by a quarter, as in diffusers.
        # (diffusers keeps a list-valued sample_size as is here; pare takes its first side.)
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = size
        self.tile_latent_min_size = int(size / (2 ** (len(block_out_channels) - 1)))
        self.tile_overlap_factor = 0.25

    # -- the SD path --------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, C_img, H, W), in [-1, 1], -> the latent distribution over (B, latent, H/8, W/8)."""
        self._check_input(x, self.config.in_channels, "encode", "images")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(x_slice) for x_slice in x.split(1)])  # one image at a time
        else:
            moments = self._encode(x)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent, h, w), unscaled (see `unscale_latents`), -> images (B, C_img, 8h, 8w) in about [-1, 1]."""
        self._check_input(z, self.config.latent_channels, "decode", "latents")
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(z_slice) for z_slice in z.split(1)])
        return self._decode(z)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct: encode, take the mean (or a sample), decode."""
        posterior = self.encode(sample)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self.tiled_encode(x)
        return self._encode_tile(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self.tiled_decode(z)
        return self._decode_tile(z)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2*latent, h, w)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _check_input(self, x: torch.Tensor, channels: int, method: str, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{method} expects {what} of shape (B, {channels}, H, W), "
                             f"got {tuple(x.shape)}" + (": add a batch dimension with x[None]" if x.ndim == 3 else ""))
        if x.dtype != self.dtype:
            raise TypeError(f"AutoencoderKL.{method}: the {what} are {x.dtype} but the VAE is {self.dtype}; "
                            f"cast them with .to(vae.dtype), or call {method}_safely, which does")
        self._check_finite(x, method, what)

    def _check_finite(self, x: torch.Tensor, method: str, what: str) -> None:
        if _tracing(x):  # counting NaNs reads a value back to the host: impossible inside a CUDA graph or compile
            return
        refuse_nonfinite(int(count_nonfinite(x)), x.numel(), method, what)

    # -- half precision: force_upcast and non-finite outputs (docs/vae.md) --------------------

    @property
    def needs_upcast(self) -> bool:
        """True when the VAE is float16 and its config says float16 overflows (`force_upcast`), as diffusers decides."""
        return self.dtype == torch.float16 and bool(self.config.force_upcast)

    def decode_safely(self, z: torch.Tensor, upcast: bool | None = None) -> torch.Tensor:
        """`decode` for pipelines: the right precision, and never a NaN image. Returns the image in the dtype it ran in.

        1. `upcast=None` follows `needs_upcast` (diffusers' SDXL rule); True or False overrides it.
        2. Decode (`z` cast to the VAE's dtype, or to float32 when upcasting; the weights are cast
           to float32 for the call and back after it, as diffusers' pipelines do).
        3. A non-finite image from a half-precision run is decoded again in float32, with a warning.
        4. A non-finite image from float32 raises FloatingPointError.
        """
        return self._run_safely(self.decode, z, upcast, "decode")

    def encode_safely(self, x: torch.Tensor, upcast: bool | None = None) -> DiagonalGaussianDistribution:
        """`encode` under the rules of `decode_safely`, checking the moments (`.parameters`) are finite."""
        return self._run_safely(self.encode, x, upcast, "encode")

    def _run_safely(self, method: Callable, x: torch.Tensor, upcast: bool | None, name: str):
        # 1. choose the precision
        upcast = self.needs_upcast if upcast is None else upcast
        dtype = torch.float32 if upcast and self.dtype not in FULL_PRECISION else self.dtype
        # 2. run
        with self._cast_to(dtype):
            out = method(x.to(dtype))
        # 3. retry a half-precision overflow in float32
        if not _is_finite(out) and dtype not in FULL_PRECISION:
            logger.warning("AutoencoderKL.%s in %s gave NaN or inf (force_upcast=%s); running it again in float32. "
                           "Set force_upcast=True in this VAE's config to skip the wasted %s pass.",
                           name, dtype, self.config.force_upcast, dtype)
            dtype = torch.float32
            with self._cast_to(dtype):
                out = method(x.to(dtype))
        # 4. give up loudly
        if not _is_finite(out):
            raise FloatingPointError(f"AutoencoderKL.{name} gave NaN or inf in {dtype} from finite inputs: "
                                     "the weights themselves are likely broken (check the checkpoint)")
        return out

    @contextlib.contextmanager
    def _cast_to(self, dtype: torch.dtype):
        """Run the model in `dtype` for the block, then restore its dtype (exact: float32 holds every fp16/bf16 value)."""
        original = self.dtype
        if dtype == original:
            yield
            return
        self.to(dtype)
        try:
            yield
        finally:
            self.to(original)

    # -- latent scaling, for the pipelines ----------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """An encoded latent -> the UNet's latent space: (z - shift) * scaling_factor (LDM sec. 4.3.2, D.1).

        With `latents_mean` / `latents_std` in the config: (z - mean) * scaling_factor / std, per
        channel, as diffusers' SDXL pipelines do; otherwise `shift_factor` (None: 0) is the shift.
        """
        cfg = self.config
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean, std = self._per_channel(cfg.latents_mean, z), self._per_channel(cfg.latents_std, z)
            return (z - mean) * cfg.scaling_factor / std
        if cfg.shift_factor is not None:
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale_latents`: the UNet's latents -> what `decode` takes."""
        cfg = self.config
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean, std = self._per_channel(cfg.latents_mean, latents), self._per_channel(cfg.latents_std, latents)
            return latents * std / cfg.scaling_factor + mean
        latents = latents / cfg.scaling_factor
        return latents + cfg.shift_factor if cfg.shift_factor is not None else latents

    @staticmethod
    def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)

    # -- memory: slicing and tiling -----------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time: same result, peak memory of one image."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Encode and decode images larger than `tile_sample_min_size` in overlapping, blended tiles.

        Memory stays that of one tile, so 2048^2 images fit. The result is close to, not equal
        to, the untiled one: each tile's GroupNorms and attention see only that tile.
        """
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, W) -> moments (B, 2*latent, H/8, W/8), tile by tile."""
        return self._tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent, h, w) -> images (B, C_img, 8h, 8w), tile by tile."""
        return self._tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)

    def _tiled(self, x: torch.Tensor, run_tile: Callable, tile_in: int, tile_out: int) -> torch.Tensor:
        """diffusers' tiling, step for step: tiles of `tile_in` go in, tiles of `tile_out` come out."""
        # 1. Cut x into tiles starting every `stride` pixels, so neighbours overlap by tile_in - stride.
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend_extent = int(tile_out * self.tile_overlap_factor)
        row_limit = tile_out - blend_extent
        rows = [[run_tile(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
                for i in range(0, x.shape[2], stride)]
        # 2. Cross-fade each output tile into the (already blended) tile above it and the one to its
        #    left, in place and in this order, exactly as diffusers does.
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    self.blend_v(rows[i - 1][j], tile, blend_extent)
                if j > 0:
                    self.blend_h(row[j - 1], tile, blend_extent)
        # 3. Keep each tile's top-left row_limit x row_limit (the rest is covered by its neighbours), stitch.
        return torch.cat([torch.cat([tile[:, :, :row_limit, :row_limit] for tile in row], dim=3) for row in rows],
                         dim=2)  # (B, C, sum of kept heights, sum of kept widths)

    @staticmethod
    def blend_v(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """b's first rows <- a linear cross-fade from a's last rows (weight y/extent on b). In place on b."""
        extent = min(a.shape[2], b.shape[2], blend_extent)
        if extent > 0:
            w = _ramp(extent, b.device).view(1, 1, -1, 1)  # (1, 1, E, 1)
            b[:, :, :extent, :] = a[:, :, -extent:, :] * (1 - w) + b[:, :, :extent, :] * w
        return b

    @staticmethod
    def blend_h(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """b's first columns <- a linear cross-fade from a's last columns. In place on b."""
        extent = min(a.shape[3], b.shape[3], blend_extent)
        if extent > 0:
            w = _ramp(extent, b.device).view(1, 1, 1, -1)  # (1, 1, 1, E)
            b[:, :, :, :extent] = a[:, :, :, -extent:] * (1 - w) + b[:, :, :, :extent] * w
        return b


def _ramp(extent: int, device: torch.device) -> torch.Tensor:
    """0, 1/E, ..., (E-1)/E in float32: diffusers' per-row weights y / blend_extent."""
    return torch.arange(extent, device=device, dtype=torch.float32) / extent


def count_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """The number of NaN and inf values in x, as a 0-d tensor on x's device (reading it waits for the GPU)."""
    return (~torch.isfinite(x)).sum()


def refuse_nonfinite(n_bad: int, numel: int, method: str, what: str) -> None:
    if n_bad:
        raise ValueError(f"AutoencoderKL.{method}: {n_bad} of {numel} {what} values are NaN or inf; "
                         "the VAE cannot map them to anything finite, so the fault is upstream")


def _is_finite(out) -> bool:
    tensor = out.parameters if isinstance(out, DiagonalGaussianDistribution) else out
    return bool(torch.isfinite(tensor).all())


def _tracing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured or torch.compile traces: no host reads of tensor values then."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
