"""Parity tooling that needs no diffusers: the comparison helper and the tolerance table."""

from .compare import Comparison, Row, assert_parity, compare
from .tolerances import DTYPES, TOLERANCES, Tolerance, dtype_name, tolerance_for

__all__ = ["Comparison", "Row", "assert_parity", "compare", "DTYPES", "TOLERANCES", "Tolerance", "dtype_name", "tolerance_for"]
