#!/usr/bin/env bash
# The fast path on the device machine: its GPU tests, a kernel profile, parity and a benchmark; logs in $OUT.
# Usage (device tool, from the repo root, carrying .whl):  [STEPS="tests profile parity bench"] bash scripts/gpu_fast.sh
source scripts/gpu_prelude.sh
set -o pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import triton, torch; print('triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
for step in ${STEPS:-tests profile parity bench}; do
  echo "=== $step ($(date -u +%T)) ==="
  case $step in
    tests) timeout ${T_TESTS:-200} python3 -m pytest parity_tests/test_fast.py --device cuda --dtype fp16 -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/test_fast.log" | tail -12 ;;
    profile) timeout ${T_PROFILE:-150} python3 benchmarks/profile_kernels.py --models ${PROFILE_MODELS:-sd15} --cases ${PROFILE_CASES:-unet,vae-decode} --modes graph,fast --out "$OUT" 2>&1 | tee "$OUT/profile.log" | grep -v Warning ;;
    parity) for cfg in ${PARITY_CONFIGS:-sd15}; do timeout ${T_PARITY:-150} python3 -m pare.cli parity --fast --config $cfg --device cuda --dtype fp16 --components ${PARITY_COMPONENTS:-unet,vae} --out "$OUT/parity-fast-$cfg" 2>&1 | tail -14; done ;;
    bench) timeout ${T_BENCH:-200} python3 -m pare.cli bench --models ${BENCH_MODELS:-sd15} --cases ${BENCH_CASES:-unet,vae-decode} --batches 2 --modes ${BENCH_MODES:-graph,fast} --out "$OUT" --stem ${BENCH_STEM:-bench-fast} 2>&1 | grep -v "it/s\|Warning" | tail -30 ;;
  esac
done
