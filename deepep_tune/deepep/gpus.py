"""What the node offers, without importing torch: GPU count, CUDA MPS, and the SM limits they imply."""

from __future__ import annotations

import os
import subprocess

from .config import SUPPORTED_RANKS


def gpu_count() -> int:
    """Visible GPUs via nvidia-smi (importing torch would add seconds to every launch)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]))
    return n


def mps_running() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def sms_cap(device_sms: int, ranks_per_gpu: int) -> int:
    """Largest num_sms a rank may use. One rank per GPU: every SM (even). Co-located ranks: every rank's kernel
    spins on its peers, so all ranks' blocks must be resident at once (below the SM count, or they deadlock
    until DeepEP's ~100 s timeout traps)."""
    if ranks_per_gpu <= 1:
        return device_sms // 2 * 2
    return ((device_sms - 1) // ranks_per_gpu) // 2 * 2


def gpu_error(num_ranks: int, num_gpus: int, colocate: bool) -> str | None:
    """Checks that need to know the GPUs (deepep backend only)."""
    if num_gpus == 0:
        return "no CUDA GPU is visible: run on a GPU node, or use --backend reference for a CPU dry run"
    if num_ranks > num_gpus and not colocate:
        fits = num_gpus if num_gpus in SUPPORTED_RANKS else 2
        return (f"{num_ranks} ranks but only {num_gpus} GPU(s) visible: use ./run.sh {fits} ..., "
                "or --colocate for a functional check with several ranks per GPU (not NVLink numbers)")
    if num_ranks > num_gpus and not mps_running():
        return ("--colocate needs CUDA MPS so that co-located ranks run concurrently (time-slicing gives meaningless "
                "numbers and can deadlock): start it with 'nvidia-cuda-mps-control -d'")
    return None
