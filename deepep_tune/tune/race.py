"""Racing: every config gets a short first pass; only the configs that can still win get the full count.

A config whose short pass is already `margin` slower than the fastest fully measured config of its op cannot be
the answer, and its tenth slow call teaches nothing more than its third. The margin sits far above the noise of a
short pass (README 'Racing': 10-iteration medians of one config deviate by 0.2 % at the median and 2-9 % at the
99th percentile on the H100 pair's logs; a 3-iteration median is robust to one outlier call), so a contender is
never dropped for one noisy pass. The per-num_sms table stays right: search.settle_rows gives the full count to
every row's best that only had a short pass."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RaceSettings:
    iters: int = 3  # timed iterations of the short pass (0: every config gets the full count)
    warmup: int = 1
    margin: float = 0.10  # the full count goes to configs within this fraction of their op's running best

    @property
    def on(self) -> bool:
        return self.iters > 0


class Race:
    """The running best of each op over its fully measured configs, and the decision a short pass gets."""

    def __init__(self, settings: RaceSettings) -> None:
        self.settings = settings
        self.best: dict[str, float] = {}

    def deserves_full(self, op: str, short_us: float) -> bool:
        best = self.best.get(op)
        return math.isfinite(short_us) and (best is None or short_us <= best * (1 + self.settings.margin))

    def measured_full(self, op: str, time_us: float) -> None:
        if math.isfinite(time_us):
            self.best[op] = min(self.best.get(op, math.inf), time_us)
