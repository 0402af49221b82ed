#!/usr/bin/env bash
# ./run.sh [ranks] [quick|full] [tuner flags]
# Validates the flags, then starts one process per rank as torchrun --standalone would (python -m deepep_tune.tune.rank
# --mode <mode> [flags], with torchrun's environment) and relaunches with --resume if a config kills or hangs a rank (see deepep_tune/tune/launch.py).
cd "$(dirname "$0")" || exit 1
exec "${PYTHON:-python3}" -m deepep_tune "$@"
