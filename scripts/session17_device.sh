# seventeenth session: on an H100, the bench (issue 14 names an H100); on another card, the LMS error diagnostics
source scripts/gpu_prelude.sh
# As run at 391acbd this line read `export PYTHONPATH=.`, which dropped the prelude's path to the carried diffusers:
# the UniPC line below then failed to collect (its log says so); the bench re-sources the prelude and was unaffected.
export PYTHONPATH=.:$PYTHONPATH
name=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "$name"; echo tree $(bash scripts/tree_id.sh); date -u
timeout 100 python3 -m pytest parity_tests/test_scheduling_unipc_multistep.py --device cuda --dtype fp16 --fast -q -p no:cacheprovider -rfE 2>&1 | tail -4 | tee $OUT/unipc.log
if [[ $name == *H100* ]]; then
  STEPS=bench bash scripts/gpu_fast.sh
else
  A="--fast --config sd15 --device cuda --dtype fp16 --components pipeline --schedulers LMS --steps 50"
  for s in 1 2; do
    timeout 120 python3 -m pare.cli parity $A --seed $s --out $OUT/lms-fused-seed$s 2>&1 | tail -1
    timeout 120 python3 scripts/parity_unfused.py $A --seed $s --out $OUT/lms-unfused-seed$s 2>&1 | tail -1
    for f in fused unfused; do grep "after step 50\|image" $OUT/lms-$f-seed$s.md | awk -F'|' '{print $3 "|" $(NF-2)}' | sed "s/^/$f seed $s /"; done
  done
  rm -f $OUT/*.png
fi
