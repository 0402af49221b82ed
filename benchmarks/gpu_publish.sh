#!/usr/bin/env bash
# The published real-node runs (two H100s joined by NVLink, one rank per GPU), in priority order, each packed
# into $OUT/<name>.tgz as soon as it finishes (so a cut-off call keeps what finished; at most 8 files come
# back per call, so run the parts in separate calls). See ../shared/device/README.md.
#   bash benchmarks/gpu_publish.sh [PART...]      PART: a (DeepSeek-V3 quick x2, full x2, layer check, audit)
#                                                       b (Qwen3 full + layer check, fp8, multi-size, forward,
#                                                          SGLang alignment, Ctrl-C)
set -u
source .whl/gpu_env.sh > /tmp/gpu_env.txt 2>&1
tail -1 /tmp/gpu_env.txt | tee -a "$OUT/summary.txt"
R=results/h100-nvlink
mkdir -p "$R"
run() {  # name timeout_s flags...
  local name=$1 limit=$2; shift 2
  local d=$R/$name start=$(date +%s%N)
  rm -rf "$d"; mkdir -p "$d"
  timeout "$limit" ./run.sh 2 "$@" --out-dir "$d" > "$d/console.txt" 2>&1
  local rc=$?
  echo "=== $name rc=$rc wall_s=$(( ($(date +%s%N) - start) / 1000000000 )) ./run.sh 2 $*" | tee -a "$OUT/summary.txt"
  tr '\r' '\n' < "$d/console.txt" | grep -E '^\[best\]|^\[run\] done|^\[bandwidth\]|^\[advice\]|^\[layer\]|^error' \
    | cut -c1-260 | tee -a "$OUT/summary.txt"
  tar czf "$OUT/$name.tgz" "$d"
}
for part in "${@:-a b}"; do
case $part in
a)
  run ep2_deepseekv3_quick_1 150 quick --model deepseek-v3
  run ep2_deepseekv3_quick_2 150 quick --model deepseek-v3
  run ep2_deepseekv3_full_1 300 full --model deepseek-v3 --layer-check
  run ep2_deepseekv3_full_2 300 full --model deepseek-v3 --compare $R/ep2_deepseekv3_quick_1/RESULTS_EP2.json $R/ep2_deepseekv3_quick_2/RESULTS_EP2.json
  timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_audit.py \
    $R/ep2_deepseekv3_full_1/RESULTS_EP2.json > "$OUT/audit.txt" 2>&1
  echo "=== audit rc=$?" | tee -a "$OUT/summary.txt"; grep -v '^\[rank\|^W1\|^\*\*\*' "$OUT/audit.txt" | tail -12 | tee -a "$OUT/summary.txt"
  for r in $R/ep2_deepseekv3_full_1; do  # where a layer forward's time goes, by kernel
    timeout 180 python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_layer_profile.py \
      $r/RESULTS_EP2.json 2>&1 | grep -v 'UserWarning\|_warn_once\|^W1\|^\*\*\*\|OMP' > "$OUT/profile.txt"
  done
  ;;
b)
  run ep2_qwen3-30b-a3b_full 300 full --model qwen3-30b-a3b --layer-check
  run ep2_deepseekv3_fp8_quick 150 quick --model deepseek-v3 --dispatch-dtype fp8
  run ep2_deepseekv3_3sizes_quick 200 quick --model deepseek-v3 --num-tokens 1024,4096,16384 --baseline-a2a --plot
  run ep2_deepseekv3_forward_quick 150 quick --model deepseek-v3 --objective forward
  run ep2_deepseekv3_fp8_align128_quick 150 quick --model deepseek-v3 --dispatch-dtype fp8 --expert-alignment 128
  # Ctrl-C: the whole process group, as a terminal does, 12 s into a full sweep; then the stop latency
  d=$R/ep2_ctrl_c; rm -rf "$d"; mkdir -p "$d"
  setsid ./run.sh 2 full --model deepseek-v3 --out-dir "$d" > "$d/console.txt" 2>&1 &
  pid=$!; sleep 12; start=$(date +%s%N); kill -INT -- -$pid; wait $pid; rc=$?
  echo "=== ctrl-c rc=$rc stop_ms=$(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/summary.txt"
  tr '\r' '\n' < "$d/console.txt" | grep -v '^\[tune\] EP' | tail -4 | tee -a "$OUT/summary.txt"
  tar czf "$OUT/ep2_ctrl_c.tgz" "$d"
  ;;
esac
done
