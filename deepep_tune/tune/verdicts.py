"""What a run concludes after the search: one config for several token counts, the final interleaved comparison
against the baselines and other runs' picks, the MoE layer check, and the SM advice."""

from __future__ import annotations

import glob
import os
from typing import Any

from ..knobs import Baseline, Knobs, KnobSpace
from ..record.results import load_results
from .backends.base import Backend
from .measure import Measurer
from .options import Options, layer_shape, layer_sizes_source, rerun_command
from .outputs import Overall, SizeOutcome
from .search import (
    Candidate,
    SmsRow,
    choose_overall,
    measure_baselines,
    retime,
    sm_advice,
)


class CompareError(ValueError):
    pass


def pick_overall(outcomes: list[SizeOutcome], measurers: dict[int, Measurer], backend: Backend, world: int) -> Overall:
    """Measure every size's winner at every other size, then pick one config for all sizes."""
    cands = list(dict.fromkeys((oc.best.dispatch, oc.best.combine) for oc in outcomes))
    parts: dict[Candidate, dict[int, tuple[float, float]]] = {c: {} for c in cands}
    for oc in outcomes:
        n = oc.workload.num_tokens
        for d, c in cands:
            parts[(d, c)][n] = (measurers[n].time("dispatch", d), measurers[n].time("combine", c))
    totals = {k: {n: sum(v) for n, v in by_n.items()} for k, by_n in parts.items()}
    best_at = {oc.workload.num_tokens: oc.best.total_us for oc in outcomes}
    (d, c), losses = choose_overall(totals, best_at)
    # The top level describes the recommended config at the first token count: baselines there again,
    # at the recommended num_sms ("DeepEP's default at the tuned num_sms").
    first = measurers[outcomes[0].workload.num_tokens]
    decl = backend.knob_space
    bases = measure_baselines(first, decl.baselines(world, max(d.num_sms, c.num_sms), backend.facts()),
                              backend.sms_cap)
    by_size = {n: {"dispatch_us": round(parts[(d, c)][n][0], 2), "combine_us": round(parts[(d, c)][n][1], 2),
                   "total_us": round(totals[(d, c)][n], 2), "loss_pct": round(100 * losses[n], 2)} for n in best_at}
    answer_parts = {op: first.parts_of(op, cfg) for op, cfg in (("dispatch", d), ("combine", c))}
    return Overall(d, c, by_size, bases, answer_parts)


def compared_picks(o: Options, decl: KnobSpace, world: int, path_out: str) -> dict[str, tuple[Knobs, Knobs, str]]:
    """Picks of other results files for the same node and workload (--compare, or an earlier run's results in
    --out-dir, e.g. quick's beside full's): they join the final re-timing, which gives their real regret."""
    explicit = list(o.search.compare)
    paths = explicit or sorted(p for p in glob.glob(os.path.join(o.outputs.out_dir, f"RESULTS_EP{world}*.json"))
                               if not p.endswith("_sglang.json") and os.path.abspath(p) != os.path.abspath(path_out))
    out = {}
    for p in paths:
        try:
            r = load_results(p)
        except (OSError, ValueError) as e:
            if explicit:
                raise CompareError(f"--compare {p}: not a results file of this tool ({e})") from None
            continue
        same = (r.ep_size == world and {**r.workload, "num_tokens": 0} == {**o.shape.as_dict(), "num_tokens": 0}
                and r.objective == o.search.objective)
        if decl.library == "deepep-v1" and (same or explicit):
            d, c = r.dispatch.tuned(), r.combine.tuned()
            out[f"{r.mode or 'other'}_pick:{os.path.basename(os.path.dirname(os.path.abspath(p)))}"] = (d, c, p)
    return out


def final_comparison(meas: Measurer, answer: SmsRow, baselines: list[Baseline], compare: dict[str, Any],
                     rounds: int) -> dict[str, Any]:
    """The pick against every measured baseline and compared pick, interleaved round by round."""
    cands = {"pick": (answer.dispatch, answer.combine)}
    cands.update({b.name: (b.dispatch, b.combine) for b in baselines if b.skipped is None and b.total_us is not None})
    cands.update({name: (d, c) for name, (d, c, _) in compare.items()})
    out = retime(meas, cands, rounds, reference="pick")
    for name, (d, c, path) in compare.items():
        out[name].update(source=path, dispatch=d.as_dict(), combine=c.as_dict())
    return {"rounds": rounds, "what": "interleaved re-timing at the first token count; speedup_of_pick = "
                                      "candidate / pick per round (median, p10, p90)", "candidates": out}


def layer_candidates(answer: SmsRow, rows: list[SmsRow], baselines: list[Baseline],
                     names: tuple[str, ...]) -> dict[str, Candidate]:
    """The pick, each op's best at a few smaller SM counts, and the library's layer baselines (`names`)."""
    cands = {"pick": (answer.dispatch, answer.combine)}
    for s in (24, 32, 48, 64):
        row = next((r for r in rows if r.num_sms == s), None)
        if row is not None and s != answer.num_sms:
            cands[f"best_at_{s}_sms"] = (row.dispatch, row.combine)
    by_name = {b.name: b for b in baselines if b.skipped is None}
    cands.update({n: (by_name[n].dispatch, by_name[n].combine) for n in names if n in by_name})
    return cands


def run_layer_check(o: Options, backend: Backend, answer: SmsRow, outcome: SizeOutcome) -> dict[str, Any]:
    shape = layer_shape(o, outcome.workload.num_tokens)
    assert shape is not None, "options_error checks --layer-check's sizes before any rank starts"
    backend.use(outcome.workload)
    names = backend.knob_space.layer_baselines
    cands = layer_candidates(answer, outcome.rows, outcome.baselines, names)
    layer = backend.layer_check(shape, cands, o.layer_check.layer_rounds, o.measurement.warmup,
                                reference=next((n for n in names if n in cands), None))
    layer["sizes_from"] = layer_sizes_source(o)
    for sched, table in layer.get("schedules", {}).items():
        timed = {n: v["median_ms"] for n, v in table.items() if v.get("median_ms") is not None}
        if timed:
            fastest = min(timed, key=timed.__getitem__)
            s = layer["num_sms"][fastest]
            layer.setdefault("fastest", {})[sched] = {
                "candidate": fastest, "num_sms": s,
                "verdict": (f"{sched}: the layer is fastest with {fastest} at {s} SMs, the communication-only pick "
                            f"uses {answer.num_sms}" + ("" if s == answer.num_sms else
                                                         " (SMs given to DeepEP are taken from the GEMMs)"))}
    return layer


def advice(o: Options, decl: KnobSpace, world: int, argv: list[str], rows: list[SmsRow], answer: SmsRow,
           layer: dict[str, Any] | None) -> dict[str, Any] | None:
    """The smallest num_sms within --sm-tolerance of the answer: by the MoE layer's forward + backward time
    when it was checked (SMs given to DeepEP are taken from the GEMMs), else by communication time."""
    tol = o.search.sm_tolerance
    row = sm_advice(rows, tol, o.search.max_sms, answer)
    by_layer = layer_advice(layer, tol) if layer else None
    if by_layer is not None:
        row = next((r for r in rows if r.num_sms == by_layer[0]), row)
    if row is None or row.dispatch is None or row.combine is None:
        return None
    out = {
        "tolerance": tol,
        "basis": "MoE layer forward + backward" if by_layer else "communication",
        "num_sms": row.num_sms, "dispatch": row.dispatch.as_dict(), "combine": row.combine.as_dict(),
        "total_us": round(row.total_us, 2),
        "slower_than_best_pct": round(100 * (row.total_us / answer.total_us - 1), 2),
        "sms_saved": answer.num_sms - row.num_sms,
        "command": rerun_command(world, o.search.mode, argv, max_sms=row.num_sms),
    }
    needs = decl.buffer_needs(row.dispatch, row.combine, o.shape, world) if decl.buffer_needs else None
    if needs:
        out["num_nvl_bytes"] = needs["num_nvl_bytes"]
    if by_layer:
        out["layer_slower_than_fastest_pct"] = by_layer[1]
    return out


def layer_advice(layer: dict[str, Any], tolerance: float) -> tuple[int, float] | None:
    """(num_sms, % slower than the fastest) of the fewest-SM tuned candidate (the pick or the best config at a
    smaller num_sms) whose layer forward + backward (sequential schedule) is within tolerance of the fastest."""
    table = layer.get("schedules", {}).get("sequential", {})
    tuned = {n: v["median_ms"] for n, v in table.items()
             if (n == "pick" or n.startswith("best_at_")) and v.get("median_ms") is not None}
    if not tuned:
        return None
    fastest = min(tuned.values())
    within = [(layer["num_sms"][n], round(100 * (t / fastest - 1), 2)) for n, t in tuned.items()
              if t <= fastest * (1 + tolerance)]
    return min(within)
