"""Triton kernels of the fast path, each with a plain-PyTorch twin for the CPU and for checking.

`triton_ready(x)` says whether a tensor can go through a Triton kernel here: Triton is installed,
and the tensor is on a CUDA device (or TRITON_INTERPRET=1 runs kernels on the CPU, for tests).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_ready(x: torch.Tensor) -> bool:
    return triton_available() and (x.is_cuda or interpreting())
