"""Timing, isolated: fixed iteration counts (every rank must launch the same number of collective
kernels, so counts never come from a local time budget), one measurement per iteration, optional
L2 flush outside the timed region, and the cross-rank reduction."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist


class Timer(Protocol):
    def __call__(self, fn: Callable[[], object]) -> float:
        """Run fn once and return its duration in microseconds."""


def wall_timer(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


class CudaEventTimer:
    """Events on the current stream. DeepEP's non-async dispatch/combine make the compute stream wait for
    the comm stream, so the pair brackets host-side launch work, the CPU sync and the kernels."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e3


def bench(
    fn: Callable[[], object],
    *,
    warmup: int,
    iters: int,
    timer: Timer,
    before_each: Callable[[], object] | None = None,
) -> list[float]:
    """Samples (us) of `iters` timed runs after `warmup` untimed ones; before_each runs outside the timing."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
        samples.append(timer(fn))
    return samples


@dataclass(frozen=True)
class Reduced:
    """One measurement combined across ranks. time_us is the slowest rank's median: a collective is as
    fast as its slowest participant."""

    time_us: float
    median_us: float  # = time_us (kept under its statistic's name in the log)
    min_us: float  # fastest sample on any rank
    max_us: float  # slowest sample on any rank
    rank0_median_us: float
    failed_ranks: int


def reduce_samples(samples: list[float], failed: bool, group: dist.ProcessGroup | None = None) -> Reduced:
    """Gather every rank's statistics in one collective (CPU tensors: the tuner's control plane is gloo)."""
    inf = float("inf")
    if samples and not failed:
        mine = [statistics.median(samples), min(samples), max(samples), 0.0]
    else:
        mine = [inf, inf, inf, 1.0]
    t = torch.tensor(mine, dtype=torch.float64)
    if dist.is_initialized():
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        rows = [p.tolist() for p in parts]
    else:
        rows = [mine]
    worst = max(r[0] for r in rows)
    return Reduced(
        time_us=worst,
        median_us=worst,
        min_us=min(r[1] for r in rows),
        max_us=max(r[2] for r in rows),
        rank0_median_us=rows[0][0],
        failed_ranks=int(sum(r[3] for r in rows)),
    )
