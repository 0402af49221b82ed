"""Search strategies over a Space. They see only an Oracle, so they run unchanged against real
kernels, the CPU reference or a replayed landscape. Every decision depends only on all-reduced
times, so all ranks walk the same sequence of configs in lockstep.

Coupling comes from the library's declaration (knobs.KnobSpace): an answer gives both ops the same value of
each shared knob. DeepEP v1 shares num_sms (a dispatch handle fixes it), so its answer is one num_sms with the
best dispatch (nvl_chunk, nvl_buffer) and the best combine (nvl_chunk, nvl_buffer) there. A library whose ops
choose their SM counts apart (V2) gets one row per SM budget: the best of each op within it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from ..knobs import OPS, SMS, Baseline, Knobs, Space
from ..stats import mean_times, quantiles
from .timing import round_order


class Oracle(Protocol):
    def time(self, op: str, cfg: Knobs) -> float:
        """Mean of the observations of (op, cfg), measuring it first if it has none; inf if it failed."""

    def remeasure(self, op: str, cfg: Knobs) -> float:
        """Add one more observation (with more iterations) and return the new mean."""

    def observed(self) -> dict[tuple[str, Knobs], list[float]]:
        """Every observation so far."""

    def can_measure(self, op: str, cfg: Knobs) -> bool:
        """False for a config that cannot be measured at all (a replayed landscape may lack it)."""

    def sample(self, op: str, cfg: Knobs, role: str) -> float:
        """One more measurement that does not join the observations (the final re-timing)."""

    def is_short(self, op: str, cfg: Knobs) -> bool:
        """Only a short first pass measured this config (racing: it could not win)."""

    def promote(self, op: str, cfg: Knobs) -> float:
        """Give a config that only had a short pass the full count; returns its new time."""


class SearchError(RuntimeError):
    pass


@dataclass(frozen=True)
class SmsRow:
    num_sms: int
    dispatch: Knobs | None
    dispatch_us: float
    combine: Knobs | None
    combine_us: float
    measured: int = 0  # configs measured at this num_sms (both ops): quick probes most num_sms with 1 per op
    group: tuple[tuple[str, Any], ...] = ()  # values of the library's other shared knobs

    @property
    def total_us(self) -> float:
        return self.dispatch_us + self.combine_us


def _best(times: dict[tuple[str, Knobs], float], op: str) -> tuple[Knobs | None, float]:
    cands = [(t, c) for (o, c), t in times.items() if o == op and math.isfinite(t)]
    if not cands:
        return None, math.inf
    t, c = min(cands)  # ties break towards the smaller config
    return c, t


def per_sms_table(obs: dict[tuple[str, Knobs], list[float]], space: Space) -> list[SmsRow]:
    """Best dispatch and combine at each num_sms that has measurements of both ops in the space (per group of the
    library's other shared knobs). When the ops choose their SM counts apart, a row is an SM budget: the best of
    each op within it, kept where one of them uses the whole budget."""
    decl = space.decl
    members = {op: set(space.configs(op)) for op in OPS}
    times = {k: v for k, v in mean_times(obs).items() if k[1] in members[k[0]]}
    rows = []
    for g in space.groups():
        in_group = {k: t for k, t in times.items() if decl.group_of(k[1]) == g}
        for s in space.sms_values():
            at = {k: t for k, t in in_group.items()
                  if (decl.sms_of(k[1]) == s if decl.sms_shared else decl.sms_of(k[1]) <= s)}
            d, dt = _best(at, "dispatch")
            c, ct = _best(at, "combine")
            if d is None or c is None or max(decl.sms_of(d), decl.sms_of(c)) != s:
                continue
            n = sum(1 for (_, cfg) in in_group if decl.sms_of(cfg) == s)
            rows.append(SmsRow(s, d, dt, c, ct, n, g))
    return rows


def pick(rows: list[SmsRow], max_sms: int | None = None) -> SmsRow | None:
    ok = [r for r in rows if max_sms is None or r.num_sms <= max_sms]
    return min(ok, key=lambda r: (r.total_us, r.num_sms)) if ok else None


def full_search(oracle: Oracle, space: Space) -> None:
    """Every config of the space, the largest num_sms first: the fastest configs usually sit there, so racing
    (tune/race.py) learns early what a contender has to beat."""
    for s in reversed(space.sms_values()):
        for op in OPS:
            for cfg in space.grid(op, s):
                oracle.time(op, cfg)


def _coordinate_search(oracle: Oracle, space: Space, op: str, num_sms: int, start: Knobs | None,
                       rounds: int = 3) -> Knobs | None:
    """Coordinate descent on the op's other knobs at one num_sms (DeepEP v1: nvl_chunk, nvl_buffer): scan every
    value of one knob with the others fixed, knob after knob, until none moves. Whole-axis scans, not neighbour
    steps: on the recorded landscapes the chunk axis has isolated minima (e.g. chunk 2) that a local step misses."""
    grid = set(space.grid(op, num_sms))
    if not grid:
        return None
    free = [k for k in space.decl.knobs[op] if k != SMS]
    cur = start if start in grid else (space.decl.probe_config(op, sorted(grid)) if start is None else
                                       min(grid, key=lambda c: (*(abs(getattr(c, k) - getattr(start, k)) for k in free),
                                                                c)))
    for _ in range(rounds):
        before = cur
        for axis in free:
            line = [c for c in grid if all(getattr(c, a) == getattr(cur, a) for a in free if a != axis)]
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
    decl = space.decl
    sms = space.sms_values()
    if not sms:
        return
    probe: dict[str, Knobs | None] = {op: None for op in OPS}
    totals: dict[int, float] = {}
    for s in sms:
        total = 0.0
        for op in OPS:
            grid = space.grid(op, s)
            cfg = decl.probe_config(op, grid) if grid else None
            total += oracle.time(op, cfg) if cfg else math.inf
        totals[s] = total
    ranked = sorted(sms, key=lambda s: (totals[s], s))
    best_cfg: dict[tuple[str, int], Knobs | None] = {}

    def inner(s: int, start: dict[str, Knobs | None]) -> float:
        total = 0.0
        for op in OPS:
            st = start.get(op)
            cfg = _coordinate_search(oracle, space, op, s, st and st.replace(**{SMS: s}))
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
        decl = space.decl
        for r in close:
            for op, op_best, chosen in (("dispatch", r.dispatch_us, r.dispatch), ("combine", r.combine_us, r.combine)):
                near = sorted((t, c) for (o, c), t in times.items()
                              if o == op and decl.sms_of(c) == decl.sms_of(chosen) and c in members[op]
                              and decl.group_of(c) == r.group and t <= op_best * (1 + tolerance))[:max_per_op]
                for _, c in near:
                    oracle.remeasure(op, c)


def settle_rows(oracle: Oracle, space: Space) -> None:
    """Racing leaves configs that could not win the op with their short pass only; a row of the per-num_sms table
    must still rest on full measurements, so each row's best that had only a short pass gets the full count (and
    the rows are computed again, since the full count may move that best)."""
    while True:
        rows = per_sms_table(oracle.observed(), space)
        short = [(op, c) for r in rows for op, c in (("dispatch", r.dispatch), ("combine", r.combine))
                 if c is not None and oracle.is_short(op, c)]
        if not short:
            return
        for op, c in dict.fromkeys(short):
            oracle.promote(op, c)


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


Candidate = tuple[Knobs, Knobs]  # (dispatch, combine) of one answer


def sms_of_pair(c: Candidate) -> int:
    """SMs an answer occupies: the larger of its ops' counts (they run one after the other)."""
    return max(int(c[0].num_sms), int(c[1].num_sms))


def choose_overall(totals: dict[Candidate, dict[int, float]], best_at: dict[int, float]) -> tuple[Candidate, dict[int, float]]:
    """One config for several token counts: the candidate with the smallest mean relative loss against each
    size's own optimum (ties: fewer SMs). Returns it and its loss (fraction) at each size."""
    def losses(c: Candidate) -> dict[int, float]:
        return {n: totals[c][n] / best_at[n] - 1 for n in best_at}

    # A candidate that failed at some size is no answer for all sizes (unless nothing else is left).
    ok = [c for c in totals if all(math.isfinite(t) for t in totals[c].values())] or list(totals)
    best = min(ok, key=lambda c: (sum(losses(c).values()), sms_of_pair(c), c))
    return best, losses(best)


def _full_time(oracle: Oracle, op: str, cfg: Knobs) -> float:
    t = oracle.time(op, cfg)
    return oracle.promote(op, cfg) if oracle.is_short(op, cfg) else t


def measure_baselines(oracle: Oracle, bases: list[Baseline], sms_cap: int | None) -> list[Baseline]:
    for b in bases:
        sms = sms_of_pair((b.dispatch, b.combine))
        if sms_cap is not None and sms > sms_cap:
            b.skipped = f"num_sms {sms} exceeds this run's limit of {sms_cap}"
            continue
        if not (oracle.can_measure("dispatch", b.dispatch) and oracle.can_measure("combine", b.combine)):
            b.skipped = "not in the replayed landscape"
            continue
        # measured like any config (one the search already measured is not measured again), with the full count:
        # the results report it
        d, c = _full_time(oracle, "dispatch", b.dispatch), _full_time(oracle, "combine", b.combine)
        b.dispatch_us = d if math.isfinite(d) else None
        b.combine_us = c if math.isfinite(c) else None
    return bases


def search_and_baselines(oracle: Oracle, space: Space, mode: str, ep_size: int, max_sms: int | None,
                         sms_cap: int | None, facts: dict[str, Any] | None = None
                         ) -> tuple[SmsRow, list[SmsRow], list[Baseline]]:
    """The search, the noise guard, the pick under the SM budget, then the baselines at the pick's num_sms."""
    STRATEGIES[mode](oracle, space)
    settle_rows(oracle, space)
    refine(oracle, space, max_sms)
    rows = per_sms_table(oracle.observed(), space)
    best = pick(rows, max_sms)
    if best is None:
        raise SearchError("every config failed; see the log for the errors")
    # Baselines are measurements too: the per-num_sms table includes them, and one that beats the pick
    # becomes the pick (then DeepEP's default is measured again at the new num_sms, so "at the tuned
    # num_sms" stays true and every speed-up is against the reported answer).
    for _ in range(3):
        bases = measure_baselines(oracle, space.decl.baselines(ep_size, best.num_sms, facts or {}), sms_cap)
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
        for n in round_order(names, r):
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
