"""Search strategies over a Space. They see only an Oracle, so they run unchanged against real
kernels, the CPU reference or a replayed landscape. Every decision depends only on all-reduced
times, so all ranks walk the same sequence of configs in lockstep.

Coupling: a dispatch handle fixes num_sms, so the answer is one num_sms with the best dispatch
(nvl_chunk, nvl_buffer) and the best combine (nvl_chunk, nvl_buffer) at that num_sms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from .bench import quantiles
from .measure import mean_times
from .space import COMMUNITY_CONFIG, DEEPEP_DEFAULT_NUM_SMS, OPS, Space, TuneConfig, deepep_default


class Oracle(Protocol):
    def time(self, op: str, cfg: TuneConfig) -> float:
        """Mean of the observations of (op, cfg), measuring it first if it has none; inf if it failed."""

    def remeasure(self, op: str, cfg: TuneConfig) -> float:
        """Add one more observation (with more iterations) and return the new mean."""

    def observed(self) -> dict[tuple[str, TuneConfig], list[float]]:
        """Every observation so far."""

    def can_measure(self, op: str, cfg: TuneConfig) -> bool:
        """False for a config that cannot be measured at all (a replayed landscape may lack it)."""

    def sample(self, op: str, cfg: TuneConfig, role: str) -> float:
        """One more measurement that does not join the observations (the final re-timing)."""


class SearchError(RuntimeError):
    pass


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


@dataclass
class Baseline:
    """A fixed config the pick is compared with, measured like any config."""

    name: str
    description: str
    dispatch: TuneConfig
    combine: TuneConfig
    dispatch_us: float | None = None
    combine_us: float | None = None
    skipped: str | None = None

    @property
    def total_us(self) -> float | None:
        if self.dispatch_us is None or self.combine_us is None:
            return None
        return self.dispatch_us + self.combine_us


def make_baselines(ep_size: int, best_sms: int) -> list[Baseline]:
    r = ep_size
    return [
        Baseline("deepep_default", f"DeepEP's get_dispatch/combine_config for {r} ranks at the tuned num_sms",
                 deepep_default("dispatch", r, best_sms), deepep_default("combine", r, best_sms)),
        Baseline("deepep_default_20sms", f"DeepEP as shipped: Buffer.num_sms={DEEPEP_DEFAULT_NUM_SMS} and its "
                                         f"{r}-rank table", deepep_default("dispatch", r), deepep_default("combine", r)),
        Baseline("community_24_8_256", "Config(24, 8, 256) for both ops (upstream test and widely pasted)",
                 TuneConfig(*COMMUNITY_CONFIG), TuneConfig(*COMMUNITY_CONFIG)),
    ]


def baseline_configs(ep_size: int, sms_values: list[int]) -> list[tuple[str, TuneConfig]]:
    """Every config a baseline may measure: DeepEP's table at any num_sms of the space, and (24, 8, 256)."""
    return [(op, deepep_default(op, ep_size, s)) for op in OPS for s in set(sms_values) | {DEEPEP_DEFAULT_NUM_SMS}] \
        + [(op, TuneConfig(*COMMUNITY_CONFIG)) for op in OPS]


def measure_baselines(oracle: Oracle, bases: list[Baseline], sms_cap: int | None) -> list[Baseline]:
    for b in bases:
        if sms_cap is not None and b.dispatch.num_sms > sms_cap:
            b.skipped = f"num_sms {b.dispatch.num_sms} exceeds this run's limit of {sms_cap}"
            continue
        if not (oracle.can_measure("dispatch", b.dispatch) and oracle.can_measure("combine", b.combine)):
            b.skipped = "not in the replayed landscape"
            continue
        # measured like any config; one the search already measured is not measured again
        d, c = oracle.time("dispatch", b.dispatch), oracle.time("combine", b.combine)
        b.dispatch_us = d if math.isfinite(d) else None
        b.combine_us = c if math.isfinite(c) else None
    return bases


def search_and_baselines(oracle: Oracle, space: Space, mode: str, ep_size: int, max_sms: int | None,
                         sms_cap: int | None) -> tuple[SmsRow, list[SmsRow], list[Baseline]]:
    """The search, the noise guard, the pick under the SM budget, then the baselines at the pick's num_sms."""
    STRATEGIES[mode](oracle, space)
    refine(oracle, space, max_sms)
    rows = per_sms_table(oracle.observed(), space)
    best = pick(rows, max_sms)
    if best is None:
        raise SearchError("every config failed; see the log for the errors")
    # Baselines are measurements too: the per-num_sms table includes them, and one that beats the pick
    # becomes the pick (then DeepEP's default is measured again at the new num_sms, so "at the tuned
    # num_sms" stays true and every speed-up is against the reported answer).
    for _ in range(3):
        bases = measure_baselines(oracle, make_baselines(ep_size, best.num_sms), sms_cap)
        rows = per_sms_table(oracle.observed(), space)
        new = pick(rows, max_sms)
        moved = new is not None and new.num_sms != best.num_sms
        best = new or best
        if not moved:
            break
    return best, rows, bases


def retime(oracle: Oracle, candidates: dict[str, Candidate], rounds: int, reference: str) -> dict[str, Any]:
    """Re-time the candidates interleaved: every round measures each once, in an order rotated by one per
    round, so drift or a noisy moment hits all alike. Speed-ups are per-round ratios against `reference`
    (the pick), summarised as median and p10-p90."""
    names = list(candidates)
    totals: dict[str, list[float]] = {n: [] for n in names}
    parts: dict[str, dict[str, list[float]]] = {n: {"dispatch": [], "combine": []} for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            d, c = candidates[n]
            td, tc = oracle.sample("dispatch", d, "retime"), oracle.sample("combine", c, "retime")
            parts[n]["dispatch"].append(td)
            parts[n]["combine"].append(tc)
            totals[n].append(td + tc)
    out: dict[str, Any] = {}
    for n in names:
        ok = [t for t in totals[n] if math.isfinite(t)]
        entry: dict[str, Any] = {"rounds": rounds, "failed_rounds": rounds - len(ok)}
        if ok:
            entry["total_us"] = {k: round(v, 2) for k, v in quantiles(ok).items()}
            for op in OPS:
                entry[f"{op}_us"] = round(quantiles([t for t in parts[n][op] if math.isfinite(t)])["median"], 2)
        ratios = [b / a for a, b in zip(totals[reference], totals[n]) if math.isfinite(a) and math.isfinite(b)]
        if n != reference and ratios:
            entry["speedup_of_pick"] = {k: round(v, 3) for k, v in quantiles(ratios).items()}
        out[n] = entry
    return out
