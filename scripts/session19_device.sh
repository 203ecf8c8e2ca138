# nineteenth session, first measuring call: NOTES change 49 (the schedule's host copy kept by set_timesteps) on the
# GPU: its tests and the loop's, the schedulers' GPU tier, the host syncs of a call, its A/B, the timeline after it
source scripts/gpu_prelude.sh
export PYTHONPATH=.:$PYTHONPATH
quiet() { grep -v "pare bench:\|kept in float32\|_warn_once\|deprecate"; }
name=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)
echo "$name"; echo tree $(bash scripts/tree_id.sh); date -u
{ echo "$name"; echo "tree $(bash scripts/tree_id.sh)"; date -u +%F; timeout 150 python3 -m pytest parity_tests/test_fast.py --device cuda --dtype fp16 -q -p no:cacheprovider -rfE -k "loop or schedul or host or fused or step or sampler" 2>&1; } | tee $OUT/test_fast.log | tail -4
{ echo "$name"; echo "tree $(bash scripts/tree_id.sh)"; date -u +%F; timeout 150 python3 -m pytest parity_tests/test_scheduling_utils.py parity_tests/test_scheduling_ddim.py parity_tests/test_scheduling_euler_discrete.py parity_tests/test_scheduling_dpmsolver_multistep.py parity_tests/test_scheduling_lms_discrete.py parity_tests/test_scheduling_pndm.py parity_tests/test_scheduling_unipc_multistep.py parity_tests/test_scheduling_euler_ancestral_discrete.py --device cuda -q -p no:cacheprovider -rfE -x 2>&1; } | tee $OUT/test_schedulers.log | tail -4
timeout 90 python3 benchmarks/sync_points.py --model sd15 --steps 50 2>&1 | quiet | tee $OUT/syncs.log | tail -12
timeout 170 python3 benchmarks/ab_host.py --model sd15 --steps 50 --out $OUT 2>&1 | quiet | tail -3
timeout 100 python3 benchmarks/image_timeline.py --model sd15 --steps 50 --json $OUT/timeline-sd15-after.json 2>&1 | quiet | grep -A14 '"idle_by_host_mark_ms"\|"wall_ms"'
