#!/usr/bin/env bash
# GPU validation runs (see ../shared/device/README.md). Usage on the GPU machine:
#   bash benchmarks/gpu_validate.sh OUTDIR RUN [RUN...]
# where RUN is ranks:mode[:extra flags with + for spaces]; each run goes to OUTDIR/<n>_ep<ranks>_<mode>.
set -u
out=${1:?outdir}; shift
source .whl/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
i=0
for spec in "$@"; do
  i=$((i + 1))
  IFS=: read -r ranks mode extra <<<"$spec"
  d=$out/${i}_ep${ranks}_${mode}
  flags=${extra//+/ }
  echo "=== ./run.sh $ranks $mode --colocate $flags --out-dir $d"
  start=$(date +%s%N)
  timeout 300 ./run.sh "$ranks" "$mode" --colocate $flags --out-dir "$d" > "$d.out" 2>&1
  rc=$?
  echo "=== rc=$rc wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
  tr '\r' '\n' < "$d.out" | grep -v -E '^W[0-9]{4}|\*\*\*\*|^\[tune\] EP|^  File|^    |^$' | tail -"${TAIL:-45}"
done
