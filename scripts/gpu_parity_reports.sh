#!/usr/bin/env bash
# pare parity reports for the official configs on the device machine (random init; see pare/parity/checkpoint.py).
# Usage (device tool, carrying .whl): bash scripts/gpu_parity_reports.sh "sd15 sd21 sdxl" "fp16 bf16"
# Reports (Markdown, JSON, log) go to $OUT/parity.tgz, refreshed after each one so a cut-off run keeps the rest.
source scripts/gpu_prelude.sh
mkdir -p /tmp/parity
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > /tmp/parity/device.txt
for config in ${1:-sd15 sd21 sdxl}; do
  for dtype in ${2:-fp16 bf16}; do
    start=$(date +%s)
    python3 -m pare.cli parity --config "$config" --device cuda --dtype "$dtype" \
      --out "/tmp/parity/$config-$dtype" > "/tmp/parity/$config-$dtype.log" 2>&1
    rc=$?
    echo "$config $dtype rc=$rc $(( $(date +%s) - start ))s: $(grep -E '^(PASS|FAIL)' /tmp/parity/$config-$dtype.log)"
    tail -3 "/tmp/parity/$config-$dtype.log" | grep -iE "error|Traceback" && tail -30 "/tmp/parity/$config-$dtype.log"
    tar czf "$OUT/parity.tgz" -C /tmp/parity .
  done
done
