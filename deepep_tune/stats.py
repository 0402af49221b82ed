"""Statistics over measured times, shared by the search, the reports and the layer check."""

from __future__ import annotations

import math
from statistics import fmean
from typing import Hashable, Mapping


def mean_times(obs: Mapping[Hashable, list[float]]) -> dict:
    """Mean of each key's observations; inf if any observation failed."""
    return {k: (math.inf if any(math.isinf(x) for x in v) else fmean(v)) for k, v in obs.items() if v}


def quantiles(xs: list[float]) -> dict[str, float]:
    """Median and the 10th-90th percentile spread (linear interpolation), for reported comparisons."""
    v = sorted(xs)

    def q(p: float) -> float:
        pos = p * (len(v) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9)}
