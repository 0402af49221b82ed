#!/usr/bin/env bash
# Fault handling with real DeepEP on the GPU machine: two configs DeepEP itself rejects (Config ctor:
# chunk >= buffer; host assert: buffer larger than the allocation) and a rank that hangs before launching
# its kernel (the peer's kernel spins; the watchdog fires; run.sh relaunches and resumes).
#   bash benchmarks/gpu_faults.sh OUTDIR [faults] [ctrlc]      (default: both)
set -u
out=${1:?outdir}; shift
parts=${*:-faults ctrlc}
source .whl/gpu_env.sh >/dev/null
if [[ $parts == *faults* ]]; then
export DEEPEP_TUNE_EXTRA_CONFIGS="dispatch:8,16,8;dispatch:8,8,4096"
export DEEPEP_TUNE_INJECT="hang@combine:8,6,256@1"
start=$(date +%s%N)
./run.sh 2 full --colocate --max-sms 8 --timeout-s 10 --out-dir "$out" > "$out.out" 2>&1
echo "=== faults rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
grep -E '^\[run\]|^\[resume\]|^\[best\]|Timeout' "$out.out" | cut -c1-220
grep -h '"status": "\(error\|crashed\|wrong\)"' "$out"/logs/*.jsonl | cut -c1-400
fi
[[ $parts == *ctrlc* ]] || exit 0

# Ctrl-C in the middle of a sweep, then --resume (no injection).
unset DEEPEP_TUNE_EXTRA_CONFIGS DEEPEP_TUNE_INJECT
setsid ./run.sh 4 full --colocate --out-dir "$out-ctrlc" > "$out-ctrlc.out" 2>&1 &
pid=$!
sleep 25
kill -INT -- -$pid
start=$(date +%s%N)
wait $pid
echo "=== ctrl-c rc=$? stop_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
grep -E '^\[run\] interrupted|^\[tune\] interrupted' "$out-ctrlc.out" | cut -c1-200 | sort | uniq -c
grep -c '"op"' "$out-ctrlc"/logs/*.jsonl
start=$(date +%s%N)
./run.sh 4 full --colocate --out-dir "$out-ctrlc" --resume > "$out-resume.out" 2>&1
echo "=== resume rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
grep -E '^\[resume\]|^\[best\]|^\[run\] the GPU|^error' "$out-resume.out"
grep -h '"status": "\(error\|crashed\|wrong\)"' "$out-ctrlc"/logs/*.jsonl | cut -c1-200
