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
    """One measurement combined across ranks.

    time_us, the value the search uses, is the median over iterations of the slowest rank in each
    iteration: a collective iteration is as slow as its slowest participant. Measured on co-located
    H100 ranks, per-rank samples are bimodal (the rank that starts later waits less, and the roles
    swap between iterations), so each rank's median flips between modes, while the per-iteration max
    repeated within 1 % (benchmarks/noise_probe.py, 2 ranks on one H100). max_rank_median_us (each rank's median, all-reduced with MAX) is kept too."""

    time_us: float
    max_rank_median_us: float
    min_us: float  # fastest sample on any rank
    max_us: float  # slowest sample on any rank
    rank0_median_us: float
    failed_ranks: int


def reduce_samples(samples: list[float], failed: bool, iters: int, group: dist.ProcessGroup | None = None) -> Reduced:
    """Gather every rank's samples in one collective (CPU tensors: the tuner's control plane is gloo).
    Every rank passes the same `iters`; a failed rank contributes inf."""
    inf = float("inf")
    mine = list(samples) if samples and not failed and len(samples) == iters else [inf] * iters
    t = torch.tensor(mine + [1.0 if failed or mine[0] == inf else 0.0], dtype=torch.float64)
    if dist.is_initialized():
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        table = torch.stack(parts)
    else:
        table = t[None]
    per_rank, nfailed = table[:, :-1], int(table[:, -1].sum())
    if nfailed:
        return Reduced(inf, inf, inf, inf, inf, nfailed)
    medians = per_rank.median(dim=1).values  # torch's median is the lower middle value for even counts
    return Reduced(
        time_us=statistics.median(per_rank.max(dim=0).values.tolist()),
        max_rank_median_us=float(medians.max()),
        min_us=float(per_rank.min()),
        max_us=float(per_rank.max()),
        rank0_median_us=float(medians[0]),
        failed_ranks=0,
    )
