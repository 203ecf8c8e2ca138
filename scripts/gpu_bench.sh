#!/usr/bin/env bash
# The benchmark runs behind benchmarks/results/ (device tool, from the repo root, carrying .whl).
# Each writes JSON, Markdown and PNG to $OUT (header: device, driver, torch, diffusers, pare, dtype, date),
# then copied to benchmarks/results/. Each `benchmarks/run.py` call is one run: quote ratios within it.
#   bash scripts/gpu_bench.sh            # ~5 min: every model and case, eager and CUDA graph
#   bash scripts/gpu_bench.sh compile    # ~5 min: the SD1.5 UNet at batch 2 under torch.compile
source scripts/gpu_prelude.sh
if [ "${1:-}" = compile ]; then
  # Two runs, so that a cut-off one keeps the other (each compile takes about a minute per library).
  python3 benchmarks/run.py --models sd15 --cases unet --batches 2 --modes eager,graph,compile \
    --out "$OUT" --stem h100-fp16-sd15-unet-eager-graph-compile
  python3 benchmarks/run.py --models sd15 --cases unet --batches 2 --modes compile-ro \
    --out "$OUT" --stem h100-fp16-sd15-unet-compile-ro
else
  python3 benchmarks/run.py --models sd15,sd21,sdxl --modes eager,graph --out "$OUT" --stem h100-fp16-eager-graph
fi
