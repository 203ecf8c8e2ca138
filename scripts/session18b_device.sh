# eighteenth session, second call: the host-side changes of NOTES change 48 (one CLIP call for CFG's two prompts,
# the VAE's input check read after the decoder is queued, GraphCache's checks as maps): the GPU tests, their A/B,
# the timeline after them, the --fast image's parity, the fast image's bench
source scripts/gpu_prelude.sh
export PYTHONPATH=.:$PYTHONPATH
quiet() { grep -v "pare bench:\|kept in float32\|_warn_once\|deprecate"; }
name=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "$name"; echo tree $(bash scripts/tree_id.sh); date -u
{ echo "$name"; echo "tree $(bash scripts/tree_id.sh)"; date -u +%F; timeout 170 python3 -m pytest parity_tests/test_fast.py --device cuda --dtype fp16 -q -p no:cacheprovider -rfE 2>&1; } | tee $OUT/test_fast.log | tail -8
timeout 150 python3 benchmarks/ab_host.py --model sd15 --steps 50 --out $OUT 2>&1 | quiet | tail -3
timeout 100 python3 benchmarks/image_timeline.py --model sd15 --steps 50 --json $OUT/timeline-sd15-after.json 2>&1 | quiet | grep -A12 '"idle_by_host_mark_ms"\|"wall_ms"'
timeout 150 python3 -m pare.cli parity --fast --config sd15 --device cuda --dtype fp16 --components pipeline --steps 50 --out $OUT/parity-fast-sd15-pipeline 2>&1 | tail -3
rm -f $OUT/*.png $OUT/*/*.png
timeout 120 python3 -m pare.cli bench --models sd15 --cases pipeline --modes fast --out "$OUT" --stem sd15-pipeline-fast 2>&1 | quiet | tail -6
