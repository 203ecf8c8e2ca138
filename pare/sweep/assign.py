"""Which rank runs which sweep case: a deterministic, cost-balanced assignment that keeps a checkpoint's cases
together.

Round robin (case i to rank i % N) balances cases of equal cost, but a sweep's are not equal (an SDXL
pipeline case against a scheduler case), and it sends the cases of one random-init checkpoint
to every rank, so that every rank makes every checkpoint. Instead, greedily, longest first (LPT,
Graham 1969): take the cases by falling estimated cost (ties: spec order) and give each to the rank
where it would finish earliest, counting the checkpoint build on a rank that does not have that
checkpoint yet (ties: the lowest rank). Every rank computes the same assignment from the same
spec. Each rank then runs its share in spec order, which keeps one checkpoint's cases next to each
other (config, dtype and seed are the outer axes).

The costs are rough relative estimates, not measurements: enough to keep SDXL pipeline cases apart
and scheduler cases from mattering.
"""

from __future__ import annotations

from .spec import Case

CONFIG_COST = {"tiny": 1.0, "tiny-sdxl": 1.5, "sd15": 10.0, "sd21": 20.0, "sdxl": 40.0}  # ~ UNet FLOPs per image
DTYPE_COST = {"fp32": 1.0, "fp64": 3.0, "fp16": 3.0, "bf16": 3.0}  # below fp32 a float64 twin runs too
BUILD_COST = 2.0  # making and saving a checkpoint, in units of one UNet case of its config


def case_cost(case: Case, steps: int) -> float:
    """A case's estimated cost, in units of a tiny fp32 UNet case."""
    component = {"scheduler": 0.05, "pipeline": 1.0 + steps}.get(case.component, 1.0)  # a pipeline: UNet per step
    return CONFIG_COST.get(case.config, 1.0) * DTYPE_COST[case.dtype] * component


def build_cost(case: Case, model_given: bool) -> float:
    return 0.0 if model_given else BUILD_COST * CONFIG_COST.get(case.config, 1.0) * DTYPE_COST[case.dtype]


def checkpoint_key(case: Case) -> tuple:
    return (case.config, case.seed, case.dtype)


def assign(cases: list[Case], size: int, steps: int, model_given: bool = False) -> list[list[Case]]:
    """Each rank's cases, in spec order."""
    load, built = [0.0] * size, [set() for _ in range(size)]
    shares: list[list[Case]] = [[] for _ in range(size)]
    for case in sorted(cases, key=lambda c: (-case_cost(c, steps), c.index)):
        key = checkpoint_key(case)

        def finish(r: int) -> float:
            return load[r] + case_cost(case, steps) + (0.0 if key in built[r] else build_cost(case, model_given))

        rank = min(range(size), key=lambda r: (finish(r), r))
        load[rank] = finish(rank)
        built[rank].add(key)
        shares[rank].append(case)
    return [sorted(share, key=lambda c: c.index) for share in shares]
