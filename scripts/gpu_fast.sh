#!/usr/bin/env bash
# The fast path on the device machine: its GPU tests, a kernel profile, --fast parity reports and the
# benchmarks committed under benchmarks/results/ (bench-h100-*.md, bench-h200-*.md, by the card); logs and results land in $OUT.
# Usage (device tool, from the repo root, carrying .whl). Each group fits one 10-minute call:
#   STEPS="tests profile parity" bash scripts/gpu_fast.sh
#   STEPS="bench" bash scripts/gpu_fast.sh            # SDXL, SD1.5 with compile-graph, the SDXL pipeline (about 7 min)
# tests: test_fast.py's GPU tier (TESTS_K, a -k expression, say "loop or guided", to pick; TESTS_ARGS for more pytest
# options, split on spaces); its log starts with the device, the code's hash (scripts/tree_id.sh) and the date.
# suite: the whole parity suite's GPU tier on the fast path (SUITE_K, a -k expression, spaces kept, to split it over calls;
# SUITE_ARGS for other pytest options, split at spaces;
# SUITE_FILES, test files in the order to run them, in place of parity_tests).
# parity-samplers: the --fast pipeline parity over the fused samplers (PARITY_SCHEDULERS to pick them: class names or
# web-UI sampler names, comma-separated). ab-loop takes AB_SCHEDULER (either kind of name, spaces kept).
# Diagnostics: ab (benchmarks/ab_fast.py: the fast path's options, A/B in one run), ab-loop (benchmarks/ab_loop.py:
# the loop graph against the stepping loop), gemm (benchmarks/gemm_geglu.py: the fused GEGLU GEMM's tiles, per
# shape, against cuBLAS and the gate kernel; GEMM_ARGS="--cold" with the operands out of L2), attention
# (benchmarks/attention.py: the attention kernel's tiles, per shape, against SDPA; ATTN_ARGS for its options), conv
# (benchmarks/conv_probe.py: a Triton 3x3 conv against cuDNN's on SD1.5's shapes), syncs (benchmarks/sync_points.py:
# the host syncs of a fast pipeline call), sd15-pipeline and sdxl-pipeline (a text-to-image call on the fast path
# alone, with its stages).
source scripts/gpu_prelude.sh
set -o pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import triton, torch, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)" | tee -a "$OUT/device.txt"
GPU_TAG=$(head -1 "$OUT/device.txt" | grep -o 'H[0-9]*' | head -1 | tr A-Z a-z)  # h100 or h200: the bench files' stem
quiet() { grep -v "pare bench:\|kept in float32\|_warn_once\|deprecate"; }
for step in ${STEPS:-tests profile parity}; do
  echo "=== $step ($(date -u +%T)) ==="
  case $step in
    tests) { cat "$OUT/device.txt"; echo "tree $(bash scripts/tree_id.sh)"; date -u +%F; timeout ${T_TESTS:-150} python3 -m pytest parity_tests/test_fast.py --device cuda --dtype fp16 -q -p no:cacheprovider -rfE ${TESTS_K:+-k "$TESTS_K"} ${TESTS_ARGS:-} 2>&1; } | tee "$OUT/test_fast.log" | tail -12 ;;
    profile) timeout ${T_PROFILE:-120} python3 benchmarks/profile_kernels.py --models ${PROFILE_MODELS:-sd15,sdxl} --cases unet,vae-decode --modes ${PROFILE_MODES:-graph,fast} --top ${PROFILE_TOP:-25} --out "$OUT" 2>&1 | quiet ;;
    parity)
      timeout ${T_PARITY:-150} python3 -m pare.cli parity --fast --config sd15 --device cuda --dtype fp16 --components unet,vae,pipeline --steps 50 --out "$OUT/parity-fast-sd15" 2>&1 | tail -4
      timeout ${T_PARITY:-150} python3 -m pare.cli parity --fast --config sdxl --device cuda --dtype fp16 --components unet,vae --out "$OUT/parity-fast-sdxl" 2>&1 | tail -4 ;;
    parity-samplers)  # the fused samplers' 50-step SD1.5 image against diffusers (docs/parity/parity-fast-sd15-samplers.md)
      timeout ${T_PARITY:-300} python3 -m pare.cli parity --fast --config sd15 --device cuda --dtype fp16 --components pipeline --schedulers "${PARITY_SCHEDULERS:-DPMSolverMultistepScheduler,EulerDiscreteScheduler}" --steps 50 --out "$OUT/parity-fast-sd15-samplers" 2>&1 | tail -4 ;;
    ab) timeout ${T_AB:-200} python3 benchmarks/ab_fast.py --models ${AB_MODELS:-sd15,sdxl} ${AB_ARGS:-} --out "$OUT" 2>&1 | quiet | tail -4 ;;
    attention) timeout ${T_ATTN:-300} python3 benchmarks/attention.py ${ATTN_ARGS:-} --out "$OUT" 2>&1 | grep -v Warn | tail -24 ;;
    gemm) timeout ${T_GEMM:-200} python3 benchmarks/gemm_geglu.py ${GEMM_ARGS:-} --out "$OUT" 2>&1 | grep -v Warn | tail -16 ;;
    ab-loop) timeout ${T_AB:-200} python3 benchmarks/ab_loop.py --models ${AB_MODELS:-sd15} ${AB_SCHEDULER:+--scheduler "$AB_SCHEDULER"} ${AB_ARGS:-} --out "$OUT" 2>&1 | quiet | tail -3 ;;
    conv) timeout ${T_CONV:-240} python3 benchmarks/conv_probe.py --out "$OUT/conv-probe-h200.json" 2>&1 | grep -v Warn | tail -18 ;;
    syncs) timeout ${T_SYNCS:-120} python3 benchmarks/sync_points.py --model sd15 --steps 5 2>&1 | quiet | tail -25 ;;
    suite) { cat "$OUT/device.txt"; echo "tree $(bash scripts/tree_id.sh)"; date -u +%F; timeout ${T_SUITE:-540} python3 -m pytest ${SUITE_FILES:-parity_tests} --device cuda --dtype fp16 --fast -q -p no:cacheprovider -rfE ${SUITE_K:+-k "$SUITE_K"} ${SUITE_ARGS:-} 2>&1; } | tee "$OUT/suite_fast.log" | tail -15 ;;
    sd15-pipeline) timeout ${T_SD15:-150} python3 -m pare.cli bench --models sd15 --cases pipeline --modes fast --out "$OUT" --stem sd15-pipeline-fast 2>&1 | quiet | tail -8 ;;
    sdxl-pipeline) timeout ${T_SDXL:-240} python3 -m pare.cli bench --models sdxl --cases pipeline --modes fast --steps 30 --out "$OUT" --stem sdxl-pipeline-fast 2>&1 | quiet | tail -8 ;;
    bench)  # the README's benchmark table: three commands, about 430 s in all
      timeout 140 python3 -m pare.cli bench --models sdxl --cases unet,vae-decode --batches 2 --modes eager,graph,fast --out "$OUT" --stem bench-${GPU_TAG:-gpu}-sdxl 2>&1 | quiet | tail -9
      timeout 320 python3 -m pare.cli bench --models sd15 --cases unet,vae-decode,pipeline --batches 2 --modes eager,graph,compile-graph,fast --out "$OUT" --stem bench-${GPU_TAG:-gpu}-sd15 2>&1 | quiet | tail -20
      timeout ${T_SDXL_PIPE:-160} python3 -m pare.cli bench --models sdxl --cases pipeline --modes eager,fast --steps 30 --iters 5 --warmup 2 --out "$OUT" --stem bench-${GPU_TAG:-gpu}-sdxl-pipeline 2>&1 | quiet | tail -8 ;;
  esac
done
# The device returns at most 8 files: everything in one archive; the Markdown and logs also stay loose.
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz * && rm -f -- *.json *.png)
