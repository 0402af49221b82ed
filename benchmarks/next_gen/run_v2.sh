#!/usr/bin/env bash
# The tuner on DeepEP V2 (deep_ep.ElasticBuffer) on a 2-GPU node, in one call from the project root:
#   bash benchmarks/next_gen/run_v2.sh
# (device tool: carry the V2-only list of benchmarks/next_gen/README.md, "Prebuilt artifacts").
#   V2_MODELS="deepseek-v3 qwen3-30b-a3b"   models to tune, in order (default: deepseek-v3 only)
#   DEADLINE=540                            seconds for the whole script; a model that cannot start with
#                                           V2_MIN_S (150) left is skipped, a running one is cut at the deadline
#   V2_ARGS="..."                           extra tuner flags (e.g. --objective forward)
#   OUT=dir                                 where results go (default /tmp/v2_out): $OUT/v2_<model>_quick.tgz
# Steps: (a) check for the V2 and NCCL builds under $NG_WORK (/tmp/ng; README.md here); (b) env.sh v2;
# (c) the project from this checkout via PYTHONPATH (V2 needs its own PYTHONPATH, no pip install); (d) the
# tuner under ng_with_v2_nccl (torch must load V2's NCCL); (e) a short summary per model.
set -u
T0=$(date +%s); DL=${DEADLINE:-540}; OUT=${OUT:-/tmp/v2_out}; mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd); cd "$ROOT"
left() { echo $(( DL - ($(date +%s) - T0) )); }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export DEEPEP_V2_COMMIT=${DEEPEP_V2_COMMIT:-dd758ca}   # the DeepEP main commit that was built; in describe()

NG=${NG_WORK:-/tmp/ng}
[ -d "$NG/deepep/deep_ep" ] && [ -f "$NG/nccl/build/lib/libnccl.so.2" ] || {
  echo "error: no DeepEP V2 build under $NG/deepep with its NCCL under $NG/nccl/build: build them first (README.md here)"
  exit 2; }
ls "$NG/jit_v2/cache" 2>/dev/null | wc -l | xargs echo "V2 JIT cache entries:"

source "$HERE/env.sh" v2
export PYTHONPATH=$ROOT:$PYTHONPATH   # this checkout's deepep_tune beside V2's deep_ep (env.sh put it first)
python3 -c 'import tqdm, tabulate, numpy' 2>/dev/null || { echo "missing tuner dependencies (tqdm, tabulate, numpy)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -2

summary() {  # summary RESULTS.json: the pick, the baselines, the JIT seconds
  python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
b, hw = r["best"], r["hardware"]
d, c = b["dispatch"], b["combine"]
print(f"pick: dispatch {d['num_sms']} SMs {d.get('time_us')} us {d.get('parts_us')}; combine {c['num_sms']} SMs "
      f"{c.get('time_us')} us {c.get('parts_us')}; total {b.get('total_us')} us (objective {r['objective']})")
for name, x in r["baselines"].items():
    print(f"  {name:20s} d={x['dispatch'].get('num_sms')} c={x['combine'].get('num_sms')} total={x.get('total_us')} us "
          f"speed-up of the pick {x.get('speedup')} {x.get('skipped') or ''}")
print("theoretical_num_sms:", hw.get("theoretical_num_sms"), " nccl:", hw.get("nccl_loaded"))
jit = hw.get("jit_compile_s", {})
print("jit first calls (s):", {k: v for k, v in jit.items() if k != "total"}, " total", jit.get("total"))
EOF
}

rc_all=0
for model in ${V2_MODELS:-deepseek-v3}; do
  lim=$(( $(left) - 15 ))
  if [ "$lim" -lt "${V2_MIN_S:-150}" ]; then echo "== $model: skipped, only $(left) s left"; continue; fi
  d=$OUT/v2_${model}_quick
  echo "== tune $model (limit $lim s)"
  # --timeout-s 60: a measurement at a new num_sms JIT-compiles up to 3 kernels (~15 s) inside the watchdog
  ng_with_v2_nccl timeout "$lim" python3 -m deepep_tune 2 quick --backend deepep-v2 --model "$model" \
      --timeout-s 60 --out-dir "$d" ${V2_ARGS:-} > "$OUT/v2_${model}.txt" 2>&1
  rc=$?; echo "rc=$rc ($(( $(date +%s) - T0 )) s since start)"; [ $rc = 0 ] || rc_all=$rc
  grep -v -E '^W[0-9]{4}|\*\*\*\*|^\[tune\] EP' "$OUT/v2_${model}.txt" | tr '\r' '\n' | tail -30
  f=$(ls "$d"/RESULTS_EP2_deepep-v2*.json 2>/dev/null | head -1)
  [ -n "$f" ] && summary "$f"
  cp "$OUT/v2_${model}.txt" "$d/" 2>/dev/null
  tar czf "$OUT/v2_${model}_quick.tgz" -C "$OUT" "v2_${model}_quick" && rm -rf "$d"
done
ng_nccl_restore   # in case a kill left torch's NCCL swapped
ls -l "$OUT"; echo "total $(( $(date +%s) - T0 )) s"
exit $rc_all
