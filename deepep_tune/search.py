"""Search strategies over a Space. They see only an Oracle, so they run unchanged against real
kernels, the CPU reference or a replayed landscape. Every decision depends only on all-reduced
times, so all ranks walk the same sequence of configs in lockstep.

Coupling: a dispatch handle fixes num_sms, so the answer is one num_sms with the best dispatch
(nvl_chunk, nvl_buffer) and the best combine (nvl_chunk, nvl_buffer) at that num_sms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean
from typing import Protocol

from .space import OPS, Space, TuneConfig


class Oracle(Protocol):
    def time(self, op: str, cfg: TuneConfig) -> float:
        """Mean of the observations of (op, cfg), measuring it first if it has none; inf if it failed."""

    def remeasure(self, op: str, cfg: TuneConfig) -> float:
        """Add one more observation (with more iterations) and return the new mean."""

    def observed(self) -> dict[tuple[str, TuneConfig], list[float]]:
        """Every observation so far."""


@dataclass(frozen=True)
class SmsRow:
    num_sms: int
    dispatch: TuneConfig | None
    dispatch_us: float
    combine: TuneConfig | None
    combine_us: float

    @property
    def total_us(self) -> float:
        return self.dispatch_us + self.combine_us


def mean_times(obs: dict[tuple[str, TuneConfig], list[float]]) -> dict[tuple[str, TuneConfig], float]:
    return {k: (math.inf if any(math.isinf(x) for x in v) else fmean(v)) for k, v in obs.items() if v}


def _best(times: dict[tuple[str, TuneConfig], float], op: str, num_sms: int) -> tuple[TuneConfig | None, float]:
    cands = [(t, c) for (o, c), t in times.items() if o == op and c.num_sms == num_sms and math.isfinite(t)]
    if not cands:
        return None, math.inf
    t, c = min(cands)  # ties break towards the smaller config
    return c, t


def per_sms_table(obs: dict[tuple[str, TuneConfig], list[float]], space: Space) -> list[SmsRow]:
    """Best dispatch and combine at each num_sms that has measurements of both ops in the space."""
    times = {k: v for k, v in mean_times(obs).items() if k[1] in set(space.configs(k[0]))}
    rows = []
    for s in space.sms_values():
        d, dt = _best(times, "dispatch", s)
        c, ct = _best(times, "combine", s)
        if d is not None and c is not None:
            rows.append(SmsRow(s, d, dt, c, ct))
    return rows


def pick(rows: list[SmsRow], max_sms: int | None = None) -> SmsRow | None:
    ok = [r for r in rows if max_sms is None or r.num_sms <= max_sms]
    return min(ok, key=lambda r: (r.total_us, r.num_sms)) if ok else None


def full_search(oracle: Oracle, space: Space) -> None:
    """Every config of the space, num_sms ascending."""
    for s in space.sms_values():
        for op in OPS:
            for cfg in space.grid(op, s):
                oracle.time(op, cfg)


def _pattern_search(oracle: Oracle, space: Space, op: str, num_sms: int, start: TuneConfig | None,
                    chunk_step: int) -> TuneConfig | None:
    """Compass search on the (nvl_chunk, nvl_buffer) index grid at one num_sms: move to the best improving
    neighbour; when none improves, halve the chunk step; stop at step 1 with no improvement."""
    grid = space.grid(op, num_sms)
    if not grid:
        return None
    chunks = sorted({c.nvl_chunk for c in grid})
    buffers = sorted({c.nvl_buffer for c in grid})
    present = set(grid)

    def nearest(values: list[int], v: int) -> int:
        return min(range(len(values)), key=lambda i: (abs(values[i] - v), i))

    if start is None:
        start = TuneConfig(num_sms, chunks[len(chunks) // 3], 256)
    ci, bi = nearest(chunks, start.nvl_chunk), nearest(buffers, start.nvl_buffer)
    cur = TuneConfig(num_sms, chunks[ci], buffers[bi])
    if cur not in present:
        cur = min(present, key=lambda c: (abs(chunks.index(c.nvl_chunk) - ci) + abs(buffers.index(c.nvl_buffer) - bi), c))
    best_t = oracle.time(op, cur)
    step = max(1, min(chunk_step, len(chunks) // 2))
    while True:
        ci, bi = chunks.index(cur.nvl_chunk), buffers.index(cur.nvl_buffer)
        moves = [(ci + step, bi), (ci - step, bi), (ci, bi + 1), (ci, bi - 1)]
        cands = [TuneConfig(num_sms, chunks[a], buffers[b]) for a, b in moves
                 if 0 <= a < len(chunks) and 0 <= b < len(buffers)]
        scored = sorted((oracle.time(op, c), c) for c in cands if c in present)
        if scored and scored[0][0] < best_t:
            best_t, cur = scored[0]
        elif step > 1:
            step //= 2
        else:
            return cur if math.isfinite(best_t) else None


def quick_search(oracle: Oracle, space: Space, anchors: int = 4) -> None:
    """Coarse-to-fine. (1) Pattern-search both ops at a few num_sms anchors spread over the axis, each
    warm-started from the previous anchor's optimum. (2) From the best anchor, walk the num_sms axis one
    value at a time in whichever direction improves dispatch + combine, warm-started, until it stops
    improving. Near-ties are settled afterwards by refine()."""
    sms = space.sms_values()
    if not sms:
        return
    n = min(anchors, len(sms))
    idx = sorted({round(i * (len(sms) - 1) / max(1, n - 1)) for i in range(n)})
    best_cfg: dict[tuple[str, int], TuneConfig | None] = {}
    prev: dict[str, TuneConfig | None] = {op: None for op in OPS}
    coarse = max(1, max(len({c.nvl_chunk for c in space.configs(op)}) for op in OPS) // 4)

    def inner(s: int, step: int) -> float:
        total = 0.0
        for op in OPS:
            start = prev[op] and TuneConfig(s, prev[op].nvl_chunk, prev[op].nvl_buffer)
            cfg = _pattern_search(oracle, space, op, s, start, step)
            best_cfg[(op, s)] = cfg
            if cfg is None:
                return math.inf
            prev[op] = cfg
            total += oracle.time(op, cfg)
        return total

    totals = {sms[i]: inner(sms[i], coarse) for i in idx}
    center = min(totals, key=lambda s: (totals[s], s))
    for direction in (1, -1):
        i = sms.index(center)
        prev = {op: best_cfg.get((op, center)) for op in OPS}
        while 0 <= i + direction < len(sms):
            s = sms[i + direction]
            t = totals[s] if s in totals else inner(s, 2)
            totals[s] = t
            if t >= totals[sms[i]]:
                break
            i += direction


def refine(oracle: Oracle, space: Space, max_sms: int | None, tolerance: float = 0.03, rounds: int = 2,
           max_per_op: int = 3, max_sms_rows: int = 3) -> None:
    """Noise guard: configs close to the winner are re-measured (with more iterations) before one is
    picked. Candidates: the num_sms rows whose total is within `tolerance` of the best, and at each of
    them the configs of each op within `tolerance` of that op's best there."""
    for _ in range(rounds):
        rows = [r for r in per_sms_table(oracle.observed(), space) if max_sms is None or r.num_sms <= max_sms]
        best = pick(rows)
        if best is None:
            return
        close = sorted((r for r in rows if r.total_us <= best.total_us * (1 + tolerance)),
                       key=lambda r: (r.total_us, r.num_sms))[:max_sms_rows]
        times = mean_times(oracle.observed())
        for r in close:
            for op, op_best in (("dispatch", r.dispatch_us), ("combine", r.combine_us)):
                near = sorted((t, c) for (o, c), t in times.items()
                              if o == op and c.num_sms == r.num_sms and c in set(space.configs(op))
                              and t <= op_best * (1 + tolerance))[:max_per_op]
                for _, c in near:
                    oracle.remeasure(op, c)


STRATEGIES = {"full": full_search, "quick": quick_search}
