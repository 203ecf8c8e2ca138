#!/usr/bin/env bash
# Runs the parity suite on the device machine in each precision; logs land in $OUT.
# Usage (device tool, from the repo root, carrying .whl):
#   [DTYPES="fp16 bf16 fp32"] bash scripts/gpu_suite.sh [pytest targets...]      (default: parity_tests)
source scripts/gpu_prelude.sh
targets=("${@:-parity_tests}")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +"%Y-%m-%dT%H:%M:%SZ" >> "$OUT/device.txt"
for dt in ${DTYPES:-fp16 bf16 fp32}; do
  echo "=== --device cuda --dtype $dt ==="
  python3 -m pytest "${targets[@]}" --device cuda --dtype "$dt" -q -p no:cacheprovider -rfEs \
    --junitxml="$OUT/junit-$dt.xml" 2>&1 | tee "$OUT/pytest-$dt.log" | tail -25
done
