"""`pare sweep`: `pare parity` over the product of configs, dtypes, seeds, components and schedulers, sharded
across torchrun's ranks, in one combined report. `spec.py` reads the spec and lists the cases, `assign.py`
shares them out, `cases.py` runs one, `run.py` shares them out and gathers them, `report.py` and `heatmap.py` write the report."""

from . import run

__all__ = ["run"]
