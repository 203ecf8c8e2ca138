"""Ranks under torchrun: which rank this is, its device, its share of the work, gather to rank 0, and an end
barrier that names a hung rank.

    torchrun --nproc-per-node 4 -m pare.cli sweep sweep.toml      # or: torchrun ... $(which pare) sweep ...

torchrun (`torch.distributed.run`) starts one process per rank and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each. Without them pare runs as a world of one, with
no process group, so every command that uses this module also runs serially, on the CPU as well.

- Each rank is pinned to the GPU of its LOCAL_RANK (`torch.cuda.set_device`), so `"cuda"` means
  that GPU everywhere below it (parity runs, generators, pipelines).
- The default process group uses nccl on CUDA and gloo on the CPU, with the `timeout` given. Python
  objects (report rows, manifests) travel over a gloo group either way: `gather_object` then needs no
  GPU tensors, and `monitored_barrier`, the barrier that says *which* rank did not arrive, exists
  only on gloo.
- The work is shared deterministically: item i goes to rank i % world size (`shard`; generation's
  batches), so the same inputs give every rank the same share on every run, and the gathered results
  can be put back in input order. (The sweep balances its cases by cost instead: pare/sweep/assign.py.)
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


class RankTimeoutError(RuntimeError):
    """A rank did not reach a barrier within the timeout: it hung, died or was slower than the timeout allows."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout: float = 1800.0  # seconds a rank waits at a barrier or collective
    group: Any = None  # the gloo group for objects and barriers; None in a world of one

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def resolve_device(requested: str | None, local_rank: int, size: int) -> torch.device:
    """The device of this rank: `requested` (default: cuda when available), with "cuda" pinned to LOCAL_RANK's GPU."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {requested} was asked for, but torch sees no CUDA device")
    if size > 1 and device.index is not None:
        raise ValueError(f"--device {requested}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                         f"pass --device cuda (CUDA_VISIBLE_DEVICES chooses the GPUs)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: torch sees {torch.cuda.device_count()}; "
                         f"start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(index)  # from here "cuda" means this rank's GPU
    return torch.device("cuda", index)


def init(device: str | None = None, timeout: float = 1800.0) -> tuple[World, torch.device]:
    """Join torchrun's process group (if launched by torchrun) and pin this rank's device.

    `timeout`: seconds any collective or barrier waits for the other ranks before it fails.
    """
    rank, size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    device_ = resolve_device(device, local_rank, size)
    if size == 1:
        return World(timeout=timeout), device_
    wait = datetime.timedelta(seconds=timeout)
    if not dist.is_initialized():
        backend = "nccl" if device_.type == "cuda" else "gloo"
        takes_device = "device_id" in inspect.signature(dist.init_process_group).parameters  # torch >= 2.3
        kwargs = {"device_id": device_} if backend == "nccl" and takes_device else {}
        dist.init_process_group(backend, timeout=wait, **kwargs)
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=wait)
    return World(rank, size, local_rank, timeout, group), device_


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence, world: World) -> list:
    """This rank's share: items rank, rank + size, rank + 2*size, ... (round robin: neighbours, which tend to cost
    alike, land on different ranks)."""
    return list(items[world.rank :: world.size])


def gather_object(obj: Any, world: World) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks). It returns on every rank once rank 0
    holds them all: a sender that went on to `shutdown` while rank 0 still received tore gloo down under it (its
    process aborted, "terminate called without an active exception", once in CI)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0, group=world.group)
    barrier(world, "the gather of every rank's results")
    return out


def barrier(world: World, what: str) -> None:
    """Wait until every rank is here; after `world.timeout` seconds, a RankTimeoutError naming the missing ranks.

    `what` says where the ranks meet ("the end of the sweep"), for the message."""
    if not world.distributed:
        return
    try:
        dist.monitored_barrier(group=world.group, timeout=datetime.timedelta(seconds=world.timeout),
                               wait_all_ranks=True)
    except RuntimeError as e:  # gloo's message: "Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms"
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
        missing = f"rank(s) {found.group(1).strip()}" if found else "rank 0 (or the link to it)"
        raise RankTimeoutError(
            f"{world}: {missing} did not reach {what} within --timeout {world.timeout:g} s: hung, died, or slower "
            f"than the timeout allows (raise --timeout for long shards)") from e
