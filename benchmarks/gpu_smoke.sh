#!/usr/bin/env bash
# Runs on the GPU machine (see ../shared/device/README.md): co-located quick runs with real DeepEP.
# Usage: bash benchmarks/gpu_smoke.sh OUTDIR [modes...]
set -u
out=${1:?outdir}; shift
source .whl/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for spec in "$@"; do
  ranks=${spec%%:*}; mode=${spec##*:}
  d=$out/ep${ranks}_${mode}
  echo "=== ./run.sh $ranks $mode --colocate --out-dir $d"
  start=$(date +%s%N)
  timeout 280 ./run.sh "$ranks" "$mode" --colocate --out-dir "$d" 2>&1 | grep -v -E '^W[0-9]{4}|\*\*\*\*' | tr '\r' '\n' | grep -v '^\[tune\] EP' 
  echo "=== rc=${PIPESTATUS[0]} wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))"
done
