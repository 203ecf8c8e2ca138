"""Triton kernels of the fast path, each with a plain-PyTorch twin for the CPU and for checking.

`triton_ready(x)` says whether a tensor can go through a Triton kernel here: Triton is installed,
the tensor is on a CUDA device (or TRITON_INTERPRET=1, set before the import, runs kernels on
the CPU, for tests), and its dtype is one the kernels' float32 arithmetic is exact enough for
(float16, bfloat16, float32: a float64 tensor runs the PyTorch twin, in float64). The first two
facts are read once, at import, so that torch.compile can trace the check.

Tried and dropped (benchmarks/NOTES.md, change 41): launching every kernel with programmatic dependent launch
(Hopper's `griddepcontrol`), so that each may start while the one before it ends. In CUDA graphs it saved nothing
on SD1.5's UNet and cost up to 1.4% on the VAE.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return TRITON


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_ready(x: torch.Tensor) -> bool:
    return TRITON and (x.is_cuda or INTERPRET) and x.dtype in KERNEL_DTYPES
