"""Timing, isolated: fixed iteration counts (every rank must launch the same number of collective
kernels, so counts never come from a local time budget), one measurement per iteration, optional
L2 flush outside the timed region, and the cross-rank reduction."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

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
        # the stream, looked up once: Event.record() looks it up at every call (27 us each on the H200 pair, 2 per
        # timed call, benchmarks/profile_rank.py); nothing the tuner times switches streams
        self.stream = torch.cuda.current_stream()

    def __call__(self, fn: Callable[[], object]) -> float:
        self.start.record(self.stream)
        fn()
        self.end.record(self.stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e3


def bench_parts(
    calls: list[Callable[[], object]],
    *,
    warmup: int,
    iters: int,
    timer: Timer,
    before_each: Callable[[], object] | None = None,
) -> list[list[float]]:
    """Samples (us) of each call over `iters` timed iterations after `warmup` untimed ones. An iteration runs
    the calls in order (a later call may use an earlier one's output); before_each runs outside the timing,
    before every call."""
    for _ in range(warmup):
        for fn in calls:
            fn()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(iters):
        for fn, out in zip(calls, samples):
            if before_each is not None:
                before_each()
            out.append(timer(fn))
    return samples


@dataclass(frozen=True)
class Reduced:
    """One measurement combined across ranks.

    A measurement times one or more calls per iteration (its parts: a forward dispatch, the backward's
    cached dispatch, ...). Each part's time is the median over iterations of the slowest rank in that
    iteration: a collective iteration is as slow as its slowest participant. Measured on co-located H100
    ranks, per-rank samples are bimodal (the rank that starts later waits less, and the roles swap between
    iterations), so each rank's median flips between modes, while the per-iteration max repeated within 1 %
    (benchmarks/noise_probe.py, 2 ranks on one H100). time_us, the value the search uses, is the sum of the
    parts. The other statistics describe the per-iteration sum of the parts."""

    time_us: float
    parts_us: dict[str, float]
    max_rank_median_us: float  # each rank's median, all-reduced with MAX
    min_us: float  # fastest sample on any rank
    max_us: float  # slowest sample on any rank
    rank0_median_us: float
    failed_ranks: int
    samples_us: dict[str, list[float]] = field(default_factory=dict)  # per part: each iteration's slowest rank

    def after(self, earlier: dict[str, list[float]]) -> "Reduced":
        """This measurement as the continuation of an earlier one of the same config (racing's short pass): each
        part's time is the median over both passes' iterations, as if one measurement had taken them all. The
        rank statistics stay this pass's own."""
        if self.failed_ranks or set(earlier) != set(self.samples_us):
            return self
        samples = {n: [*earlier[n], *self.samples_us[n]] for n in self.samples_us}
        parts_us = {n: statistics.median(v) for n, v in samples.items()}
        return replace(self, time_us=sum(parts_us.values()), parts_us=parts_us, samples_us=samples)


def reduce_samples(parts: dict[str, list[float]], names: tuple[str, ...], failed: bool, iters: int,
                   group: dist.ProcessGroup | None = None) -> Reduced:
    """Gather every rank's samples in one collective (CPU tensors: the tuner's control plane is gloo).
    Every rank passes the same part names and `iters`; a failed rank contributes inf."""
    inf = float("inf")
    ok = not failed and all(len(parts.get(n, ())) == iters for n in names)
    mine = [x for n in names for x in parts[n]] if ok else [inf] * (iters * len(names))
    t = torch.tensor(mine + [0.0 if ok and mine[0] != inf else 1.0], dtype=torch.float64)
    if dist.is_initialized():
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, t, group=group)
        table = torch.stack(gathered)
    else:
        table = t[None]
    nfailed = int(table[:, -1].sum())
    if nfailed:
        return Reduced(inf, {n: inf for n in names}, inf, inf, inf, inf, nfailed)
    per_part = table[:, :-1].reshape(table.shape[0], len(names), iters)  # [rank, part, iteration]
    samples_us = {n: per_part[:, i].max(dim=0).values.tolist() for i, n in enumerate(names)}
    parts_us = {n: statistics.median(v) for n, v in samples_us.items()}
    totals = per_part.sum(dim=1)  # [rank, iteration]
    medians = totals.median(dim=1).values  # torch's median is the lower middle value for even counts
    return Reduced(
        time_us=sum(parts_us.values()),
        parts_us=parts_us,
        max_rank_median_us=float(medians.max()),
        min_us=float(totals.min()),
        max_us=float(totals.max()),
        rank0_median_us=float(medians[0]),
        failed_ranks=0,
        samples_us=samples_us,
    )


def round_order(units: list[Any], r: int) -> list[Any]:
    """Round r runs every unit once, the list rotated by r, so drift and warm-up order hit all units alike (the
    final re-timing and the layer check interleave their candidates this way)."""
    if not units:
        return []
    k = r % len(units)
    return units[k:] + units[:k]
