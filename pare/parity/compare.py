"""The one comparison helper: how far is pare's tensor from diffusers' (and both from float64)?

Every parity test and the `pare parity` report go through `compare`, so a number printed by
one means the same as a number printed by the other. The rules it judges by live in
`tolerances.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .tolerances import Tolerance, dtype_name, tolerance_for


@dataclass
class Comparison:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float  # max |pare - diffusers|
    where: tuple[int, ...]  # index of that max
    mismatches: int  # elements differing by more than the tolerance's scale (see below)
    rel_l2: float  # ||pare - diffusers|| / ||diffusers||
    cos_dist: float  # 1 - cos(pare, diffusers), both flattened
    pare_err64: float | None  # ||pare - ref64|| / ||ref64||
    diffusers_err64: float | None  # ||diffusers - ref64|| / ||ref64||
    tolerance: Tolerance
    passed: bool
    reason: str

    def __str__(self) -> str:
        def fmt(x):
            return "n/a" if x is None else f"{x:.3e}"

        tol = self.tolerance
        budget = ""
        if tol.budget is not None:
            budget = (
                f"\n  vs float64:  pare {fmt(self.pare_err64)}, diffusers {fmt(self.diffusers_err64)}"
                f" (budget: pare <= {tol.budget} x diffusers + {tol.floor:.2e})"
            )
        return (
            f"[{'PASS' if self.passed else 'FAIL'}] {self.name} {list(self.shape)} {self.dtype}: {self.reason}\n"
            f"  rel L2 {self.rel_l2:.3e} (limit {tol.rel_l2:.0e}), max abs {self.max_abs:.3e} at {list(self.where)}, "
            f"cos dist {self.cos_dist:.3e}, {self.mismatches} elements off by > rel L2 limit x max|diffusers|"
            f"{budget}"
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tolerance"] = asdict(self.tolerance)
        return d


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.norm().item()
    num = (x - ref).norm().item()
    return num / denom if denom > 0 else num


def compare(
    name: str,
    pare_out: torch.Tensor,
    diffusers_out: torch.Tensor,
    reference64: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    scope: str = "block",
    tolerance: Tolerance | None = None,
) -> Comparison:
    """Compare pare's output with diffusers' (and, if given, both with a float64 reference).

    `dtype` is the precision both ran in (default: diffusers_out's); it picks the tolerance
    together with `scope` ("block" or "end_to_end") unless `tolerance` is given.
    """
    if pare_out.shape != diffusers_out.shape:
        raise AssertionError(f"{name}: pare's output has shape {tuple(pare_out.shape)}, diffusers' {tuple(diffusers_out.shape)}")
    dtype = dtype_name(dtype if dtype is not None else diffusers_out.dtype)
    tol = tolerance or tolerance_for(dtype, scope)
    # All statistics in float64 on the CPU-or-device of the inputs: the measuring must not add error.
    ours, theirs = pare_out.detach().double(), diffusers_out.detach().to(pare_out.device).double()
    diff = (ours - theirs).abs()
    finite = bool(torch.isfinite(ours).all()) and bool(torch.isfinite(theirs).all())
    nan_safe = torch.nan_to_num(diff, nan=float("inf"))
    flat_idx = int(nan_safe.argmax()) if diff.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_idx), diff.shape)) if diff.ndim else ()
    max_abs = float(nan_safe.max()) if diff.numel() else 0.0
    rel_l2 = _rel_l2(ours, theirs)
    denom = (ours.norm() * theirs.norm()).item()
    cos_dist = max(0.0, 1.0 - (ours.flatten() @ theirs.flatten()).item() / denom) if denom > 0 else 0.0
    scale = tol.rel_l2 * float(theirs.abs().max()) if theirs.numel() else 0.0
    mismatches = int((nan_safe > scale).sum())

    pare_err64 = diffusers_err64 = None
    if reference64 is not None:
        ref = reference64.detach().to(pare_out.device).double()
        pare_err64, diffusers_err64 = _rel_l2(ours, ref), _rel_l2(theirs, ref)

    if not finite:
        passed, reason = False, "non-finite values (NaN or inf) in an output"
    elif rel_l2 > tol.rel_l2:
        passed, reason = False, f"pare differs from diffusers by rel L2 {rel_l2:.3e} > {tol.rel_l2:.0e}"
    elif tol.budget is not None and reference64 is None:
        passed, reason = False, f"{dtype} is judged against float64, but no float64 reference was given"
    elif tol.budget is not None and pare_err64 > tol.budget * diffusers_err64 + tol.floor:
        passed, reason = False, (
            f"pare is less accurate than diffusers: err64 {pare_err64:.3e} > "
            f"{tol.budget} x {diffusers_err64:.3e} + {tol.floor:.2e}"
        )
    else:
        passed, reason = True, "within tolerance"
    return Comparison(
        name, tuple(pare_out.shape), dtype, max_abs, where, mismatches, rel_l2, cos_dist,
        pare_err64, diffusers_err64, tol, passed, reason,
    )


@dataclass
class Row:
    """One row of a parity report: a block's (or a step's) own error, and the error that reached it.

    `local`: both sides fed the reference's inputs to this block or step, judged at block
    tolerance; it names the place where a change was made. `accumulated`: each side fed its own
    upstream results, judged at end-to-end tolerance; the drift through depth (or steps).
    None where the two views coincide (a whole model, or a row with no upstream).
    """

    name: str
    local: Comparison
    accumulated: Comparison | None = None

    @property
    def passed(self) -> bool:
        return self.local.passed and (self.accumulated is None or self.accumulated.passed)

    @property
    def reason(self) -> str:
        if not self.local.passed:
            return self.local.reason
        if self.accumulated is not None and not self.accumulated.passed:
            return f"accumulated: {self.accumulated.reason}"
        return "within tolerance"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.local.shape

    def __str__(self) -> str:
        text = f"local (same inputs on both sides): {self.local}"
        if self.accumulated is not None:
            text += f"\naccumulated (each side on its own upstream): {self.accumulated}"
        return text

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "reason": self.reason, "local": self.local.as_dict(),
                "accumulated": None if self.accumulated is None else self.accumulated.as_dict()}


def assert_parity(*args, **kwargs) -> Comparison:
    """`compare`, raising AssertionError with the full report when the check fails."""
    result = compare(*args, **kwargs)
    if not result.passed:
        raise AssertionError(str(result))
    return result
