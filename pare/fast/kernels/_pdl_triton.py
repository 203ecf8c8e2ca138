"""Programmatic dependent launch (Hopper and later; PTX `griddepcontrol`, CUDA's PDL) for the fast path's kernels.

Each kernel is launched with Triton's `launch_pdl` and starts with `begin(PDL)`. Launched so, a kernel may be
started while the kernel before it on the stream is still running its last programs; `begin` then waits until
that kernel has ended and its writes are visible (`gdc_wait`) before the kernel reads or writes anything, so
what it computes is unchanged. It then lets the kernel after it be launched early in turn
(`gdc_launch_dependents`): that one's programs take the SMs this kernel's last wave leaves idle and wait in
their own `begin`. What is saved is the launch gap between two kernels, not any work."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def begin(PDL: tl.constexpr):
    """The first statement of every kernel: with PDL, wait for the kernel before, then release the one after."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
