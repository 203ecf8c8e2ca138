"""Upsample2D on the fast path: nearest 2x upsampling and its 3x3 conv as one sub-pixel convolution.

Replaces: `pare/models/resampling.py Upsample2D.forward` (diffusers: `models/upsampling.py Upsample2D`), where
it upsamples by exactly 2 and its conv is a plain 3x3 conv with padding 1: the upsamplers of the SD UNets and VAEs.

The math. Nearest upsampling repeats each pixel of x (H, W) 2 x 2 times, so the 3x3 conv over the upsampled map
reads, for an output pixel of each row parity a (y = 2i + a), only two rows of x, with its three row taps
w0, w1, w2 (offsets -1, 0, +1) summed onto them:
    a = 0: rows (i - 1, i)  get taps (w0, w1 + w2);      a = 1: rows (i, i + 1)  get (w0 + w1, w2),
and the same along the columns. So each of the four phases (a, e) of the output is a 2x2 conv of x itself: 16
multiply-adds per output pixel and channel pair where the reference does 36 (and its input is 4x smaller). With
padding 1 a 2x2 conv of x gives H + 1 rows, whose row o reads x's rows o - 1 and o: phase a = 0 at i is row
o = i, phase a = 1 is row o = i + 1. So one conv with the four phases' kernels stacked as output channels,
(4 C_out, C_in, 2, 2), gives all four phases, each a crop of its channel block one pixel apart, and
`kernels/pixel_shuffle.py` interleaves them, adding the bias. This is the resize-convolution of Odena, Dumoulin
& Olah (Distill 2016, "Deconvolution and Checkerboard Artifacts") computed as a sub-pixel convolution (Shi et
al., arXiv 1609.05158 and 1609.07009, which show the two are the same).

Error: exact in exact arithmetic. The summed taps are summed in float32 and rounded once to the weight's dtype,
a rounding the reference's weights do not have; the budget of the fast path covers it (`pare parity --fast`).

Cost: the phase kernels hold 16 taps where the conv holds 9. Held beside the conv's weight they would cost memory
the reference does not use (52 MB for SDXL's 1280-channel upsampler, more than the fast path's margin under
diffusers' peak), so one pass (`kernels/pixel_shuffle.py phase_weight`) makes them at each call from the weight as
it is, which also keeps them right after load_state_dict or a fused LoRA. That pass reads 9 and writes 16 taps
per channel pair, while the conv saves 20 multiply-adds per channel pair and output pixel; so the path runs where
the output has at least PHASE_MIN_PIXELS pixels (the ratio of the two is the output's area, whatever the channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.resampling import Upsample2D
from .kernels.pixel_shuffle import interleave_phases, phase_weight
from .resnet import plain

PHASE_MIN_PIXELS = 64 * 64  # output pixels (2H x 2W) from which the sub-pixel conv runs; below it, the reference


class FastUpsample2D(Upsample2D):
    def sub_pixel(self, x: torch.Tensor, output_size) -> bool:
        conv = self.conv
        if conv is None or not plain(conv) or x.ndim != 4 or x.shape[1] != self.channels:
            return False
        b, c, h, w = x.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return False
        return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and 4 * h * w >= PHASE_MIN_PIXELS)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.sub_pixel(hidden_states, output_size):
            return super().forward(hidden_states, output_size)
        weight = phase_weight(self.conv.weight)  # (4 C_out, C_in, 2, 2), made at each call: see above
        p = F.conv2d(hidden_states, weight, None, padding=1)  # (B, C, H, W) -> (B, 4 C_out, H + 1, W + 1)
        return interleave_phases(p, self.conv.bias)  # -> (B, C_out, 2H, 2W)
