"""The results file's contents: provenance, the answer, the per-num_sms trade-off, baselines, the comparison,
the layer check, the advice, and what the tuned library's consumers paste (report.paste). Written by one call
(record.results.write_json_atomic) once everything is decided; nothing patches it afterwards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..deepep.routing import Traffic
from ..deepep.workload import Workload
from ..knobs import Baseline, Knobs
from ..record.results import SCHEMA_VERSION
from ..report.bandwidth import bandwidth
from ..report.paste import library_outputs
from .search import SmsRow


def _row(r: SmsRow) -> dict[str, Any]:
    row = {"num_sms": r.num_sms, "dispatch": r.dispatch.as_dict() if r.dispatch else None,
           "dispatch_us": _r(r.dispatch_us), "combine": r.combine.as_dict() if r.combine else None,
           "combine_us": _r(r.combine_us), "total_us": _r(r.total_us), "configs_measured": r.measured}
    if r.group:
        row["group"] = dict(r.group)
    return row


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 2)


@dataclass
class SizeOutcome:
    """Everything measured for one token count."""

    workload: Workload
    best: SmsRow
    rows: list[SmsRow]
    baselines: list[Baseline]
    traffic: Traffic
    spread: dict[str, Any]
    a2a: dict[str, Any] | None = None
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # the pick's time per part, per op


def baselines_section(baselines: list[Baseline], best_total_us: float,
                      comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each baseline's search-time measurement; with a final comparison, the speed-up of the pick over it
    comes from the interleaved re-timing (search_speedup keeps the search-time ratio)."""
    base_out = {}
    retimed = (comparison or {}).get("candidates", {})
    for b in baselines:
        entry: dict[str, Any] = {"description": b.description, "dispatch": b.dispatch.as_dict(),
                                 "combine": b.combine.as_dict()}
        if b.skipped:
            entry["skipped"] = b.skipped
        else:
            total = b.total_us
            ratio = round(total / best_total_us, 3) if total is not None and math.isfinite(total) else None
            entry.update(dispatch_us=_r(b.dispatch_us), combine_us=_r(b.combine_us), total_us=_r(total), speedup=ratio)
            sp = retimed.get(b.name, {}).get("speedup_of_pick")
            if sp:
                entry.update(speedup=sp["median"], speedup_p10=sp["p10"], speedup_p90=sp["p90"], search_speedup=ratio,
                             retimed_total_us=retimed[b.name]["total_us"])
        base_out[b.name] = entry
    return base_out


def size_section(o: SizeOutcome, hw: dict[str, Any], colocated: bool) -> dict[str, Any]:
    best = o.best
    assert best.dispatch is not None and best.combine is not None
    out: dict[str, Any] = {
        "num_tokens": o.workload.num_tokens,
        "best": {
            "num_sms": best.num_sms,
            "dispatch": {**best.dispatch.as_dict(), "time_us": _r(best.dispatch_us), **o.spread.get("dispatch", {}),
                         **({"parts_us": o.parts["dispatch"]} if len(o.parts.get("dispatch", {})) > 1 else {})},
            "combine": {**best.combine.as_dict(), "time_us": _r(best.combine_us), **o.spread.get("combine", {}),
                        **({"parts_us": o.parts["combine"]} if len(o.parts.get("combine", {})) > 1 else {})},
            "total_us": _r(best.total_us),
        },
        "per_num_sms": [_row(r) for r in o.rows],
        "baselines": baselines_section(o.baselines, best.total_us),
        "bandwidth": bandwidth(o.workload, o.traffic, o.parts, hw.get("device_name"), colocated, o.a2a),
    }
    if o.a2a is not None:
        a = dict(o.a2a)
        if "total_us" in a:
            fwd = sum(o.parts.get(op, {}).get(op, math.nan) for op in ("dispatch", "combine"))
            a["deepep_speedup"] = round(a["total_us"] / fwd, 3) if math.isfinite(fwd) else None
            a["deepep_compared"] = "DeepEP's forward dispatch + combine of the pick"
        out["all_to_all"] = a
    return out


@dataclass
class Overall:
    """One config for several token counts, its times at each, and the baselines at the first count."""

    dispatch: Knobs
    combine: Knobs
    by_size: dict[int, dict[str, float]]
    baselines: list[Baseline]
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # at the first token count

    def answer_at(self, n: int) -> SmsRow:
        t = self.by_size[n]
        return SmsRow(max(self.dispatch.num_sms, self.combine.num_sms), self.dispatch, t["dispatch_us"],
                      self.combine, t["combine_us"])


def _best_section(sizes: list[SizeOutcome], overall: Overall | None, primary: dict[str, Any]) -> dict[str, Any]:
    if overall is None:
        return primary["best"]
    d, c = overall.dispatch, overall.combine
    first = overall.by_size[sizes[0].workload.num_tokens]
    best = {"num_sms": max(d.num_sms, c.num_sms), "dispatch": {**d.as_dict(), "time_us": first["dispatch_us"]},
            "combine": {**c.as_dict(), "time_us": first["combine_us"]},
            "rule": "smallest mean loss against each token count's own best",
            "by_num_tokens": {str(n): v for n, v in overall.by_size.items()}, "total_us": first["total_us"]}
    return best


def build_results(meta: dict[str, Any], ep_size: int, sizes: list[SizeOutcome], overall: Overall | None,
                  verdicts: dict[str, Any], results_path: str) -> dict[str, Any]:
    """Top level: the answer (and its paste targets) and the first token count's tables, with baselines compared
    against the answer; per_num_tokens (each size against its own best) and best.by_num_tokens when several token
    counts were tuned. verdicts: the final comparison, the layer check and the SM advice."""
    hw, colocated = meta.get("hardware", {}), bool(meta.get("colocated"))
    primary = size_section(sizes[0], hw, colocated)
    w = sizes[0].workload
    comparison = verdicts.get("comparison")
    best = _best_section(sizes, overall, primary)
    if overall is None:
        disp, comb = sizes[0].best.dispatch, sizes[0].best.combine
        primary["baselines"] = baselines_section(sizes[0].baselines, sizes[0].best.total_us, comparison)
    else:
        disp, comb = overall.dispatch, overall.combine
        primary["baselines"] = baselines_section(overall.baselines, best["total_us"], comparison)
        primary["bandwidth"] = bandwidth(w, sizes[0].traffic, overall.parts, hw.get("device_name"), colocated,
                                         sizes[0].a2a)
    assert disp is not None and comb is not None
    res = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "ep_size": ep_size,
        "workload": w.as_dict(),
        "num_tokens_tuned": [s.workload.num_tokens for s in sizes],
        "best": best,
        **{k: v for k, v in primary.items() if k not in ("best", "num_tokens")},
        "comparison": comparison,
        "layer_check": verdicts.get("layer"),
        "sm_advice": verdicts.get("advice"),
        "results_path": results_path,
        **library_outputs(meta.get("library", "deepep-v1"), disp, comb, ep_size, w, results_path),
    }
    if len(sizes) > 1:
        res["per_num_tokens"] = {str(s.workload.num_tokens): size_section(s, hw, colocated) for s in sizes}
    return res
