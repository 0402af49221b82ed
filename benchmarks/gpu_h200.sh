#!/usr/bin/env bash
# DeepEP v1 runs on the two-H200 NVLink pair (one rank per GPU), each packed into $OUT/<name>.tgz as soon as it
# finishes (a cut-off call keeps what finished). Carry .whl (../shared/device/fetch_deepep_wheel.sh).
#   bash benchmarks/gpu_h200.sh            quick (twice); full with racing, re-timing the committed no-racing pick
#                                          beside its own; Qwen3-30B-A3B full with --layer-check
set -u
source .whl/gpu_env.sh > /tmp/gpu_env.txt 2>&1
tail -1 /tmp/gpu_env.txt | tee -a "$OUT/summary.txt"
python3 -m pip install -q --no-build-isolation -e . > /tmp/pip.txt 2>&1 || { cat /tmp/pip.txt; exit 1; }
R=results/h200-nvlink
mkdir -p "$R"
run() {  # name timeout_s flags...
  local name=$1 limit=$2; shift 2
  local d=$R/$name start=$(date +%s%N)
  rm -rf "$d"; mkdir -p "$d"
  timeout "$limit" ./run.sh 2 "$@" --out-dir "$d" > "$d/console.txt" 2>&1
  local rc=$?
  echo "=== $name rc=$rc wall_s=$(( ($(date +%s%N) - start) / 1000000 ))ms ./run.sh 2 $*" | tee -a "$OUT/summary.txt"
  tr '\r' '\n' < "$d/console.txt" | grep -E '^\[best\]|^\[run\] done|^\[advice\]|^\[layer\] [a-z]|^error|Error' \
    | cut -c1-240 | tee -a "$OUT/summary.txt"
  python3 - "$d" <<'EOF' | tee -a "$OUT/summary.txt"
import glob, json, sys
for p in glob.glob(sys.argv[1] + "/RESULTS_EP2*.json"):
    if p.endswith("_sglang.json"):
        continue
    r = json.load(open(p))
    print("  phases_s", r.get("phases_s"), "measurements", r.get("num_measurements"))
    for n, c in (r.get("comparison") or {}).get("candidates", {}).items():
        sp = c.get("speedup_of_pick")
        print(f"  retime {n}: {c.get('total_us')} speedup_of_pick {sp}")
EOF
  tar czf "$OUT/$name.tgz" "$d"
}
# quick twice: the first start on a fresh machine also compiles torch's bytecode into the launcher's cache
run ep2_deepseekv3_quick_first 120 quick --model deepseek-v3
run ep2_deepseekv3_quick 120 quick --model deepseek-v3
run ep2_deepseekv3_full 240 full --model deepseek-v3 \
  --compare $R/ep2_deepseekv3_full_norace/RESULTS_EP2.json
run ep2_qwen3_full_layer 240 full --model qwen3-30b-a3b --layer-check
