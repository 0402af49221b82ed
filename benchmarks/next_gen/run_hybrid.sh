#!/usr/bin/env bash
# The HybridEP tuner run on a GPU node, in one call, from the project root, on a HybridEP build under
# $NG_WORK/hybrid (default /tmp/ng; README.md here says what it must be):
#   bash benchmarks/next_gen/run_hybrid.sh                      # DeepSeek-V3 shape, quick, 2 GPUs
#   QWEN=1 bash benchmarks/next_gen/run_hybrid.sh               # then Qwen3-30B-A3B too (if time is left)
#   MODELS="qwen3-30b-a3b" bash benchmarks/next_gen/run_hybrid.sh   # only Qwen3-30B-A3B
# Knobs: OUT (/tmp/hybrid_out; results tarred to $OUT/hybrid_results.tgz), NPROC (GPUs, default all visible),
# DEADLINE (seconds for the whole script, default 570), EXTRA (more tuner flags).
# Every new HybridEP config JIT-compiles 5-10 s per process; a DeepSeek-V3 quick run measures ~30 configs.
set -u
T0=$(date +%s); DL=${DEADLINE:-570}
left() { echo $(( DL - ($(date +%s) - T0) )); }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); ROOT=$(cd "$HERE/../.." && pwd); cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/hybrid_out}; mkdir -p "$OUT"; export OUT
NP=${NPROC:-$(nvidia-smi -L | wc -l)}
MODELS=${MODELS:-deepseek-v3}; [ "${QWEN:-0}" = 1 ] && MODELS="$MODELS qwen3-30b-a3b"

[ -d "${NG_WORK:-/tmp/ng}/hybrid/deep_ep" ] || {
  echo "error: no HybridEP build under ${NG_WORK:-/tmp/ng}/hybrid: build DeepEP's hybrid-ep branch there first (README.md here)"
  exit 2; }
# shellcheck disable=SC1091
source "$HERE/env.sh" hybrid
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import deep_ep, torch; print("deep_ep:", deep_ep.__file__, "HybridEPBuffer:", hasattr(deep_ep, "HybridEPBuffer"),
            "| torch", torch.__version__, "| GPUs", torch.cuda.device_count())' 2>&1 | tee "$OUT/env.txt"
{ nvidia-smi -L; nvidia-smi topo -m; echo "CUDA_HOME=$CUDA_HOME HYBRID_EP_CACHE_DIR=$HYBRID_EP_CACHE_DIR"; } >> "$OUT/env.txt" 2>&1

names=()
for m in $MODELS; do
  name=hybrid_${m//-/_}_quick; names+=("$name")
  budget=$(( $(left) - 25 ))   # keep time to tar and summarise
  [ $budget -lt 60 ] && { echo "== $m: skipped, $(left) s left"; continue; }
  echo "== $m quick ($budget s budget)"
  # --timeout-s 120: a measurement's first calls compile 2 kernels (5-10 s each); the default 30 s is tight for
  # the very first one (preprocessing + dispatch + cached dispatch kernels).
  timeout --signal=INT --kill-after=15 $budget python3 -m deepep_tune "$NP" quick --backend hybridep --model "$m" \
      --timeout-s 120 --out-dir "$OUT/$name" ${EXTRA:-} > "$OUT/$name.txt" 2>&1
  echo "$m rc=$?"; tail -30 "$OUT/$name.txt"
done

tar czf "$OUT/hybrid_results.tgz" -C "$OUT" build.txt env.txt $(cd "$OUT" && ls -d hybrid_*_quick hybrid_*_quick.txt 2>/dev/null)
echo "== summary"
python3 - "$OUT" "${names[@]}" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
for name in sys.argv[2:]:
    files = glob.glob(os.path.join(out, name, "RESULTS_*.json"))
    if not files:
        print(f"{name}: no results file (see {name}.txt)")
        continue
    r = json.load(open(files[0]))
    b, hw = r["best"], r["hardware"]
    knobs = lambda c: {k: v for k, v in c.items() if k in ("num_sms", "tokens_per_chunk", "stages", "g2s_stages")}
    print(f"{name}: {r['num_measurements']} measurements, {r['wall_s']} s, first calls (JIT) "
          f"{hw.get('hybridep_first_call_total')}")
    print(f"  best: dispatch {knobs(b['dispatch'])} {b['dispatch']['time_us']} us + combine {knobs(b['combine'])} "
          f"{b['combine']['time_us']} us = {b['total_us']} us")
    for k, v in r["baselines"].items():
        print(f"  {k}: {v.get('total_us')} us, pick speed-up {v.get('speedup')} (p10-p90 {v.get('speedup_p10')}-"
              f"{v.get('speedup_p90')})" + (f" skipped: {v['skipped']}" if v.get("skipped") else ""))
EOF
ls -l "$OUT/hybrid_results.tgz"; echo "total $(( $(date +%s) - T0 )) s"
