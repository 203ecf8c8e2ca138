"""A torchrun worker for the tests of `pare.distributed`: each rank gathers its rank and world to rank 0, then
meets the others at the end barrier; `--sleep-rank R --sleep S` keeps rank R away for S seconds first.

    python -m torch.distributed.run --standalone --nproc-per-node 2 parity_tests/rank_worker.py --timeout 2
"""

import argparse
import sys
import time

from pare import distributed

parser = argparse.ArgumentParser()
parser.add_argument("--timeout", type=float, default=30)
parser.add_argument("--sleep-rank", type=int, default=None)
parser.add_argument("--sleep", type=float, default=0)
args = parser.parse_args()

world, device = distributed.init("cpu", args.timeout)
gathered = distributed.gather_object({"rank": world.rank, "share": distributed.shard(list(range(7)), world)}, world)
if world.is_main:
    print("gathered", gathered, flush=True)
if world.rank == args.sleep_rank:
    time.sleep(args.sleep)
try:
    distributed.barrier(world, "the end of the test")
except distributed.RankTimeoutError as e:
    print(f"timeout: {e}", flush=True)
    sys.exit(3)
print(f"{world} passed the barrier", flush=True)
distributed.shutdown(world)
