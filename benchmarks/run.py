"""Benchmark pare against diffusers (the same code `pare bench` runs).

    python benchmarks/run.py                                   # CUDA: SD1.5, eager + CUDA graph, fp16
    python benchmarks/run.py --models sd15,sd21,sdxl --modes eager,graph,compile,compile-ro
    python benchmarks/run.py --device cpu --models tiny --iters 2   # CPU smoke (what CI runs)

Results (JSON, Markdown, PNG) go to benchmarks/results/.
"""

import argparse

from pare import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    bench.run(parser.parse_args())
