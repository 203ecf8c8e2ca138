"""Parity tooling that needs no diffusers: the comparison helper and the tolerance table."""

from .compare import Comparison, assert_parity, compare
from .tolerances import DTYPES, TOLERANCES, Tolerance, dtype_name, tolerance_for

__all__ = ["Comparison", "assert_parity", "compare", "DTYPES", "TOLERANCES", "Tolerance", "dtype_name", "tolerance_for"]
