#!/usr/bin/env bash
# Fault handling with real DeepEP on the GPU machine: two configs DeepEP itself rejects (Config ctor:
# chunk >= buffer; host assert: buffer larger than the allocation) and a rank that hangs before launching
# its kernel (the peer's kernel spins; the watchdog fires; run.sh relaunches and resumes).
#   bash benchmarks/gpu_faults.sh OUTDIR
set -u
out=${1:?outdir}
source .whl/gpu_env.sh >/dev/null
export DEEPEP_TUNE_EXTRA_CONFIGS="dispatch:8,16,8;dispatch:8,8,4096"
export DEEPEP_TUNE_INJECT="hang@combine:8,6,256@1"
start=$(date +%s%N)
./run.sh 2 full --colocate --max-sms 8 --timeout-s 10 --out-dir "$out" > "$out.out" 2>&1
echo "=== faults rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
grep -E '^\[run\]|^\[resume\]|^\[best\]|Timeout' "$out.out" | cut -c1-220
grep -h '"status": "\(error\|crashed\|wrong\)"' "$out"/logs/*.jsonl | cut -c1-400
