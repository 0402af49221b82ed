#!/usr/bin/env bash
# DeepEP v1 full runs with --layer-check on the two-H200 pair, both model presets (carry .whl); each run folder
# is packed into $OUT/<name>.tgz as soon as it finishes.
set -u
source .whl/gpu_env.sh > /tmp/gpu_env.txt 2>&1
tail -1 /tmp/gpu_env.txt
python3 -m pip install -q --no-build-isolation -e . > /tmp/pip.txt 2>&1 || { cat /tmp/pip.txt; exit 1; }
R=results/h200-nvlink
for spec in "ep2_qwen3_full_layer qwen3-30b-a3b" "ep2_deepseekv3_full_layer deepseek-v3"; do
  set -- $spec
  d=$R/$1; rm -rf "$d"; mkdir -p "$d"; s=$(date +%s%N)
  timeout 240 ./run.sh 2 full --model "$2" --layer-check --out-dir "$d" > "$d/console.txt" 2>&1
  echo "=== $1 rc=$? wall_ms=$(( ($(date +%s%N) - s) / 1000000 ))"
  tr '\r' '\n' < "$d/console.txt" | grep -E '^\[best\]|^\[run\] done|^\[advice\]|^\[layer\] [a-z]|^error|Error' | cut -c1-200
  tar czf "$OUT/$1.tgz" "$d"
done
