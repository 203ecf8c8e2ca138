"""Triton kernels of the fast path, each with a plain-PyTorch twin for the CPU and for checking.

`triton_ready(x)` says whether a tensor can go through a Triton kernel here: Triton is installed,
the tensor is on a CUDA device (or TRITON_INTERPRET=1, set before the import, runs kernels on
the CPU, for tests), and its dtype is one the kernels' float32 arithmetic is exact enough for
(float16, bfloat16, float32: a float64 tensor runs the PyTorch twin, in float64). The first two
facts are read once, at import, so that torch.compile can trace the check.

`pdl(x)` gives every launch its programmatic-dependent-launch options (`_pdl_triton.py`): on for a CUDA
device of compute capability 9.0 or later (Hopper), off elsewhere and under the interpreter. `PDL = False`
turns it off for all kernels (`ab_fast.py --set kernels.PDL=0` measures what it saves).
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


PDL = True
_CAPABLE: dict[int, bool] = {}  # device index -> compute capability >= 9.0


def pdl(x: torch.Tensor) -> dict:
    """The launch options of a kernel reading x: its `PDL` constexpr and Triton's `launch_pdl`, equal."""
    on = PDL and x.is_cuda and not INTERPRET
    if on:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if index not in _CAPABLE:
            _CAPABLE[index] = torch.cuda.get_device_capability(index) >= (9, 0)
        on = _CAPABLE[index]
    return {"PDL": on, "launch_pdl": on}
