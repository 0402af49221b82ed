"""The results file: provenance, the answer, the per-num_sms trade-off, baselines and paste targets.
Written atomically; top-level normal_dispatch/normal_combine make it loadable by SGLang as-is."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .paste import buffer_notes, paste_targets, sglang_config
from .routing import Traffic
from .search import Baseline, SmsRow
from .space import TuneConfig, nvl_bytes_needed, nvl_size_hint
from .workload import Workload

SCHEMA_VERSION = 2
# NVLink 4 (H100/H200 SXM): 18 links x 25 GB/s per direction.
LINK_GBPS_PER_DIRECTION = {"H100": 450.0, "H200": 450.0}


def results_name(ep_size: int, backend: str, colocated: bool) -> str:
    """RESULTS_EP<N>.json only for real kernels with one rank per GPU; anything else says what it is."""
    suffix = "" if backend == "deepep" and not colocated else (f"_{backend}" if backend != "deepep" else "_colocated")
    return f"RESULTS_EP{ep_size}{suffix}.json"


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def bandwidth(w: Workload, tr: Traffic, parts: dict[str, dict[str, float]], device_name: str | None,
              colocated: bool, a2a: dict[str, Any] | None) -> dict[str, Any]:
    """Per op, from the forward call's time (parts["dispatch"]["dispatch"], parts["combine"]["combine"]):
    deepep_gbps, DeepEP's test formula (rank 0's received rows x hidden x bytes, counting rows a rank sends
    to itself; comparable to DeepEP's README), and nvlink_gbps, only rows that cross between ranks, per rank
    on average: what one direction of a rank's links carries. On a real node, also that as a fraction of the
    link's per-direction bandwidth and of what NCCL's all_to_all_single achieves for the same rows."""
    disp_row = w.hidden * (2 if w.dispatch_dtype == "bf16" else 1 + 4 / 128)
    comb_row = w.hidden * 2
    remote = sum(tr.remote_rows) / len(tr.remote_rows)
    link = None if colocated else next((v for k, v in LINK_GBPS_PER_DIRECTION.items() if k in (device_name or "")), None)
    out: dict[str, Any] = {"note": "deepep_gbps counts rank 0's received rows including its own (DeepEP's formula); "
                                   "nvlink_gbps counts rows received from other ranks, averaged over ranks, per "
                                   "second of the forward call"}
    if link:
        out["link_gbps_per_direction"] = link
    nccl_us = {"dispatch": (a2a or {}).get("dispatch_rows_us"), "combine": (a2a or {}).get("combine_us")}
    for op, row in (("dispatch", disp_row), ("combine", comb_row)):
        t = parts.get(op, {}).get(op)
        if t is None or not math.isfinite(t) or t <= 0:
            continue
        nv = remote * row / t / 1e3
        entry = {"deepep_gbps": round(tr.recv_rows[0] * row / t / 1e3, 2), "nvlink_gbps": round(nv, 2)}
        if link:
            entry["fraction_of_link"] = round(nv / link, 3)
        if nccl_us[op] and not colocated:
            # NCCL moves dispatch rows at their own dtype (fp8 as bytes) without scales; close enough per row
            nccl = remote * (w.hidden * (2 if op == "combine" or w.dispatch_dtype == "bf16" else 1)) / nccl_us[op] / 1e3
            entry["nccl_all_to_all_gbps"] = round(nccl, 2)
            entry["fraction_of_nccl"] = round(nv / nccl, 3)
        out[op] = entry
    return out


def _row(r: SmsRow) -> dict[str, Any]:
    return {"num_sms": r.num_sms, "dispatch": r.dispatch.as_dict() if r.dispatch else None,
            "dispatch_us": _r(r.dispatch_us), "combine": r.combine.as_dict() if r.combine else None,
            "combine_us": _r(r.combine_us), "total_us": _r(r.total_us), "configs_measured": r.measured}


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


def build_results(*, meta: dict[str, Any], ep_size: int, sizes: list[SizeOutcome],
                  overall: tuple[TuneConfig, TuneConfig, dict[int, dict[str, float]]] | None,
                  advice: dict[str, Any] | None, overall_baselines: list[Baseline] | None = None,
                  answer_parts: dict[str, dict[str, float]] | None = None, comparison: dict[str, Any] | None = None,
                  layer: dict[str, Any] | None = None, results_path: str = "RESULTS.json") -> dict[str, Any]:
    """Top level: the answer (normal_dispatch/normal_combine, paste targets) and the first token count's
    tables, with baselines compared against the answer; per_num_tokens (each size against its own best)
    and best.by_num_tokens when several token counts were tuned."""
    hw, colocated = meta.get("hardware", {}), bool(meta.get("colocated"))
    primary = size_section(sizes[0], hw, colocated)
    w = sizes[0].workload
    if overall is None:
        disp, comb = sizes[0].best.dispatch, sizes[0].best.combine
        best = primary["best"]
        primary["baselines"] = baselines_section(sizes[0].baselines, sizes[0].best.total_us, comparison)
    else:
        disp, comb, by_size = overall
        best = {"num_sms": disp.num_sms, "dispatch": disp.as_dict(), "combine": comb.as_dict(),
                "rule": "smallest mean loss against each token count's own best",
                "by_num_tokens": {str(n): v for n, v in by_size.items()}}
        first = by_size[w.num_tokens]
        best["dispatch"]["time_us"], best["combine"]["time_us"] = first["dispatch_us"], first["combine_us"]
        best["total_us"] = first["total_us"]
        if overall_baselines is not None:
            primary["baselines"] = baselines_section(overall_baselines, first["total_us"], comparison)
        primary["bandwidth"] = bandwidth(w, sizes[0].traffic, answer_parts or {}, hw.get("device_name"), colocated,
                                         sizes[0].a2a)
    assert disp is not None and comb is not None
    nvl = nvl_bytes_needed(disp, comb, w, ep_size)
    hb = w.hidden * max(w.elem_size, 2)
    nvl["size_hint"] = max(nvl_size_hint(disp, hb, ep_size), nvl_size_hint(comb, hb, ep_size))
    res = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "ep_size": ep_size,
        "workload": w.as_dict(),
        "num_tokens_tuned": [s.workload.num_tokens for s in sizes],
        "best": best,
        **{k: v for k, v in primary.items() if k not in ("best", "num_tokens")},
        "comparison": comparison,
        "layer_check": layer,
        "sm_advice": advice,
        "nvl_buffer_bytes": nvl,
        "paste": {**paste_targets(disp, comb, ep_size, w, results_path),
                  "buffer_notes": buffer_notes(disp, comb, ep_size, w)},
        **sglang_config(disp, comb),
    }
    if len(sizes) > 1:
        res["per_num_tokens"] = {str(s.workload.num_tokens): size_section(s, hw, colocated) for s in sizes}
    return res
