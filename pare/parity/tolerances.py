"""The one tolerance table every parity check in pare uses (tests and `pare parity` alike).

Why these numbers (the README shows the same table):

float32 (CPU, or CUDA with TF32 off) -- *tight*.
    pare and diffusers run the same math in a different order of operations, so they differ
    by rounding only: about 1e-7 relative per op, growing slowly with depth. A block must
    agree to relative L2 1e-5, a whole model or loop to 1e-4. A real bug (a wrong scale,
    a missing residual, a transposed weight) shows up as 1e-3 or much more.

float64 (CPU) -- *exact arithmetic*, for catching edits.
    In float64 a reordering of the same math moves a block by about 1e-16 (today pare and
    diffusers agree bit for bit: rel L2 0 on every row of the tiny configs). A block must agree
    to 1e-12 and a model or loop to 1e-10, four orders of magnitude above that roundoff and
    far below any semantic edit: an eps changed by 1e-5, a tanh-approximate GELU or a scale off
    by 1e-4 moves a block by 1e-7 .. 1e-3. `pare parity --reference-path` uses it by default on the CPU.

float16 / bfloat16 -- an *error budget* against a float64 ground truth.
    Two low-precision implementations legitimately differ by about as much as each differs
    from the exact result, so "pare == diffusers" is the wrong question. The right one is:
    *is pare at least as accurate as diffusers?* Both run in the low precision on identical
    inputs; the diffusers block also runs in float64 on the same (upcast) inputs and weights.
    pare passes when

        err64(pare) <= budget * err64(diffusers) + floor

    with err64(x) = ||x - ref64|| / ||ref64||, budget = 1.25 (pare may be at most 25% less
    accurate than the library it mirrors) and floor = the dtype's unit roundoff (2**-11 for
    fp16, 2**-8 for bf16): the error of rounding the exact result once, which no low-precision
    output can avoid, so a block whose diffusers error is near zero is not held to zero.
    As a sanity cap pare must also stay within relative L2 1e-2 (fp16) of diffusers.

NaN or inf in an output never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SCOPES = ("block", "end_to_end")


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float  # max relative L2 distance between pare and diffusers
    budget: float | None = None  # max err64(pare) / err64(diffusers); None: not judged against float64
    floor: float = 0.0  # absolute slack on the budget, in relative-L2 units


_FP16_UNIT_ROUNDOFF = 2.0**-11
_BF16_UNIT_ROUNDOFF = 2.0**-8

TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("fp32", "block"): Tolerance(rel_l2=1e-5),
    ("fp32", "end_to_end"): Tolerance(rel_l2=1e-4),
    ("fp64", "block"): Tolerance(rel_l2=1e-12),
    ("fp64", "end_to_end"): Tolerance(rel_l2=1e-10),
    ("fp16", "block"): Tolerance(rel_l2=1e-2, budget=1.25, floor=_FP16_UNIT_ROUNDOFF),
    ("fp16", "end_to_end"): Tolerance(rel_l2=1e-2, budget=1.25, floor=_FP16_UNIT_ROUNDOFF),
    ("bf16", "block"): Tolerance(rel_l2=1e-2, budget=1.25, floor=_BF16_UNIT_ROUNDOFF),
    ("bf16", "end_to_end"): Tolerance(rel_l2=1e-2, budget=1.25, floor=_BF16_UNIT_ROUNDOFF),
}


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return dtype
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no tolerance for dtype {dtype}; expected one of {sorted(DTYPES)}")


def tolerance_for(dtype: torch.dtype | str, scope: str = "block") -> Tolerance:
    if scope not in SCOPES:
        raise ValueError(f"unknown tolerance scope {scope!r}; expected one of {SCOPES}")
    return TOLERANCES[(dtype_name(dtype), scope)]
