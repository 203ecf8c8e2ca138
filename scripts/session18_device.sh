# eighteenth session: where the fast SD1.5 image's wall time leaves the GPU idle (benchmarks/image_timeline.py),
# its host syncs, the UniPC fix of session 17 on the GPU, and the fast image's bench as the baseline
source scripts/gpu_prelude.sh
export PYTHONPATH=.:$PYTHONPATH
name=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "$name"; echo tree $(bash scripts/tree_id.sh); date -u
timeout 100 python3 -m pytest parity_tests/test_scheduling_unipc_multistep.py --device cuda --dtype fp16 --fast -q -p no:cacheprovider -rfE 2>&1 | tail -4 | tee $OUT/unipc.log
timeout 150 python3 benchmarks/image_timeline.py --model sd15 --steps 50 --json $OUT/timeline-sd15.json 2>&1 | grep -v "kept in float32\|_warn_once\|deprecate" | tail -80
timeout 100 python3 benchmarks/sync_points.py --model sd15 --steps 50 2>&1 | grep -v "kept in float32\|_warn_once\|deprecate" | tail -30 | tee $OUT/syncs.log
timeout 150 python3 -m pare.cli bench --models sd15 --cases pipeline --modes fast --out "$OUT" --stem sd15-pipeline-fast 2>&1 | grep -v "pare bench:\|kept in float32\|_warn_once\|deprecate" | tail -8
