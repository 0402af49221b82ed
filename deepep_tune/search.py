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
    measured: int = 0  # configs measured at this num_sms (both ops): quick probes most num_sms with 1 per op

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
    members = {op: set(space.configs(op)) for op in OPS}
    times = {k: v for k, v in mean_times(obs).items() if k[1] in members[k[0]]}
    rows = []
    for s in space.sms_values():
        d, dt = _best(times, "dispatch", s)
        c, ct = _best(times, "combine", s)
        if d is not None and c is not None:
            n = sum(1 for (_, cfg) in times if cfg.num_sms == s)
            rows.append(SmsRow(s, d, dt, c, ct, n))
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


def _coordinate_search(oracle: Oracle, space: Space, op: str, num_sms: int, start: TuneConfig | None,
                       rounds: int = 3) -> TuneConfig | None:
    """Coordinate descent on (nvl_chunk, nvl_buffer) at one num_sms: scan every chunk at the current buffer,
    then every buffer at the best chunk, until neither moves. Whole-axis scans, not neighbour steps: on the
    recorded landscapes the chunk axis has isolated minima (e.g. chunk 2) that a local step misses."""
    grid = set(space.grid(op, num_sms))
    if not grid:
        return None
    cur = start if start in grid else (_probe_config(space, op, num_sms) if start is None else
                                       min(grid, key=lambda c: (abs(c.nvl_chunk - start.nvl_chunk),
                                                                abs(c.nvl_buffer - start.nvl_buffer), c)))
    for _ in range(rounds):
        before = cur
        for axis in ("nvl_chunk", "nvl_buffer"):
            line = [c for c in grid if all(getattr(c, a) == getattr(cur, a) for a in ("nvl_chunk", "nvl_buffer") if a != axis)]
            cur = min(line, key=lambda c: (oracle.time(op, c), c))
        if cur == before:
            break
    return cur if math.isfinite(oracle.time(op, cur)) else None


def quick_search(oracle: Oracle, space: Space, finalists: int = 3) -> None:
    """Coarse-to-fine, justified by benchmarks/search_benchmark.py on recorded landscapes:
    (1) probe every num_sms at one config per op (time falls steeply with num_sms and then flattens,
    while chunk and buffer move it by tens of percent at most, so a probe ranks num_sms well);
    (2) at the `finalists` best num_sms, a coordinate descent over (nvl_chunk, nvl_buffer) per op;
    (3) the neighbouring num_sms of the best finalist, warm-started from its optimum, while they
    improve. Near-ties are then settled by refine()."""
    sms = space.sms_values()
    if not sms:
        return
    probe: dict[str, TuneConfig | None] = {op: None for op in OPS}
    totals: dict[int, float] = {}
    for s in sms:
        total = 0.0
        for op in OPS:
            cfg = _probe_config(space, op, s)
            total += oracle.time(op, cfg) if cfg else math.inf
        totals[s] = total
    ranked = sorted(sms, key=lambda s: (totals[s], s))
    best_cfg: dict[tuple[str, int], TuneConfig | None] = {}

    def inner(s: int, start: dict[str, TuneConfig | None]) -> float:
        total = 0.0
        for op in OPS:
            st = start.get(op)
            cfg = _coordinate_search(oracle, space, op, s, st and TuneConfig(s, st.nvl_chunk, st.nvl_buffer))
            best_cfg[(op, s)] = cfg
            total += oracle.time(op, cfg) if cfg else math.inf
        return total

    searched = {s: inner(s, probe) for s in ranked[:finalists]}
    center = min(searched, key=lambda s: (searched[s], s))
    for direction in (1, -1):
        i = sms.index(center)
        while 0 <= i + direction < len(sms):
            s = sms[i + direction]
            if s not in searched:
                searched[s] = inner(s, {op: best_cfg.get((op, center)) for op in OPS})
            if searched[s] >= searched[sms[i]]:
                break
            i += direction


def _probe_config(space: Space, op: str, num_sms: int) -> TuneConfig | None:
    """A mid-range chunk and buffer 256 (DeepEP's default buffer), or the nearest config present."""
    grid = space.grid(op, num_sms)
    if not grid:
        return None
    chunks = sorted({c.nvl_chunk for c in grid})
    target = (chunks[len(chunks) // 3], 256)
    return min(grid, key=lambda c: (abs(c.nvl_chunk - target[0]) / max(chunks), abs(c.nvl_buffer - target[1]) / 256, c))


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
        members = {op: set(space.configs(op)) for op in OPS}
        for r in close:
            for op, op_best in (("dispatch", r.dispatch_us), ("combine", r.combine_us)):
                near = sorted((t, c) for (o, c), t in times.items()
                              if o == op and c.num_sms == r.num_sms and c in members[op]
                              and t <= op_best * (1 + tolerance))[:max_per_op]
                for _, c in near:
                    oracle.remeasure(op, c)


STRATEGIES = {"full": full_search, "quick": quick_search}


def sm_advice(rows: list[SmsRow], tolerance: float, max_sms: int | None = None,
              answer: SmsRow | None = None) -> SmsRow | None:
    """The smallest num_sms whose dispatch + combine is within `tolerance` of the answer (by default the
    fastest in the budget): SMs spent on communication are taken from compute, so fewer may be worth a
    small slowdown. Never more SMs than the answer."""
    best = answer or pick(rows, max_sms)
    if best is None:
        return None
    ok = [r for r in rows if r.num_sms <= best.num_sms and r.total_us <= best.total_us * (1 + tolerance)]
    return min(ok, key=lambda r: r.num_sms, default=best)


Candidate = tuple[TuneConfig, TuneConfig]  # (dispatch, combine) at one num_sms


def choose_overall(totals: dict[Candidate, dict[int, float]], best_at: dict[int, float]) -> tuple[Candidate, dict[int, float]]:
    """One config for several token counts: the candidate with the smallest mean relative loss against each
    size's own optimum (ties: fewer SMs). Returns it and its loss (fraction) at each size."""
    def losses(c: Candidate) -> dict[int, float]:
        return {n: totals[c][n] / best_at[n] - 1 for n in best_at}

    # A candidate that failed at some size is no answer for all sizes (unless nothing else is left).
    ok = [c for c in totals if all(math.isfinite(t) for t in totals[c].values())] or list(totals)
    best = min(ok, key=lambda c: (sum(losses(c).values()), c[0].num_sms, c))
    return best, losses(best)
