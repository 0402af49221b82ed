"""deep_ep.utils.envs of the CPU stand-in: only what the tuner reads."""

import functools
import os


@functools.lru_cache()
def get_nvlink_gbs(factor: float = 0.9) -> float:
    """V2 sums `nvidia-smi nvlink -s` link speeds of the first GPU x factor; the stand-in has 2x H200's links
    (18 x 26.562 GB/s) unless FAKE_V2_NVLINK_GBS says otherwise (0 = detection failed, as V2 returns then)."""
    return float(os.environ.get("FAKE_V2_NVLINK_GBS", 18 * 26.562 * factor))
