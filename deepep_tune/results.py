"""The results file: provenance, the answer, the per-num_sms trade-off, baselines and paste targets.
Written atomically; top-level normal_dispatch/normal_combine make it loadable by SGLang as-is."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from .consumers import buffer_notes, nvl_size_hint, python_patch_text, sglang_config, torchtitan_turbo_text
from .search import SmsRow
from .space import TuneConfig, align, combine_nvl_bytes, deepep_default, dispatch_nvl_bytes
from .routing import Traffic
from .workload import Workload

SCHEMA_VERSION = 1


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


def nvl_bytes_needed(dispatch: TuneConfig, combine: TuneConfig, w: Workload, ep_size: int) -> dict[str, int]:
    d = dispatch_nvl_bytes(dispatch, ep_size, w.hidden_bytes, w.num_topk, w.num_scales)
    c = combine_nvl_bytes(combine, ep_size, w.hidden, w.num_topk)
    return {"dispatch": d, "combine": c, "num_nvl_bytes": align(max(d, c))}


def bandwidth(w: Workload, tr: Traffic, dispatch_us: float, combine_us: float) -> dict[str, Any]:
    """Two figures per op. deepep_gbps: DeepEP's test formula (rank 0's received rows x hidden x bytes,
    counting rows a rank sends to itself; comparable to DeepEP's README). nvlink_gbps: only rows that
    cross between ranks, per rank on average (what NVLink carries)."""
    disp_row = w.hidden * (2 if w.dispatch_dtype == "bf16" else 1 + 4 / 128)
    comb_row = w.hidden * 2
    remote = sum(tr.remote_rows) / len(tr.remote_rows)
    out: dict[str, Any] = {"note": "deepep_gbps counts rank 0's received rows including its own (DeepEP's formula); "
                                   "nvlink_gbps counts rows received from other ranks, averaged over ranks"}
    for op, row, t in (("dispatch", disp_row, dispatch_us), ("combine", comb_row, combine_us)):
        if math.isfinite(t) and t > 0:
            out[op] = {"deepep_gbps": round(tr.recv_rows[0] * row / t / 1e3, 2),
                       "nvlink_gbps": round(remote * row / t / 1e3, 2)}
    return out


@dataclass
class Baseline:
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


def baselines_section(baselines: list[Baseline], best_total_us: float) -> dict[str, Any]:
    base_out = {}
    for b in baselines:
        entry: dict[str, Any] = {"description": b.description, "dispatch": b.dispatch.as_dict(),
                                 "combine": b.combine.as_dict()}
        if b.skipped:
            entry["skipped"] = b.skipped
        else:
            total = b.total_us
            entry.update(dispatch_us=_r(b.dispatch_us), combine_us=_r(b.combine_us), total_us=_r(total),
                         speedup=round(total / best_total_us, 3) if total is not None and math.isfinite(total) else None)
        base_out[b.name] = entry
    return base_out


def size_section(o: SizeOutcome) -> dict[str, Any]:
    best = o.best
    assert best.dispatch is not None and best.combine is not None
    base_out = baselines_section(o.baselines, best.total_us)
    out: dict[str, Any] = {
        "num_tokens": o.workload.num_tokens,
        "best": {
            "num_sms": best.num_sms,
            "dispatch": {**best.dispatch.as_dict(), "time_us": _r(best.dispatch_us), **o.spread.get("dispatch", {})},
            "combine": {**best.combine.as_dict(), "time_us": _r(best.combine_us), **o.spread.get("combine", {})},
            "total_us": _r(best.total_us),
        },
        "per_num_sms": [_row(r) for r in o.rows],
        "baselines": base_out,
        "bandwidth": bandwidth(o.workload, o.traffic, best.dispatch_us, best.combine_us),
    }
    if o.a2a is not None:
        a = dict(o.a2a)
        if "total_us" in a:
            a["deepep_speedup"] = round(a["total_us"] / best.total_us, 3)
        out["all_to_all"] = a
    return out


def build_results(*, meta: dict[str, Any], ep_size: int, sizes: list[SizeOutcome],
                  overall: tuple[TuneConfig, TuneConfig, dict[int, dict[str, float]]] | None,
                  advice: dict[str, Any] | None, overall_baselines: list[Baseline] | None = None) -> dict[str, Any]:
    """Top level: the answer (normal_dispatch/normal_combine, paste targets) and the first token count's
    tables, with baselines compared against the answer; per_num_tokens (each size against its own best)
    and best.by_num_tokens when several token counts were tuned."""
    primary = size_section(sizes[0])
    w = sizes[0].workload
    if overall is None:
        disp, comb = sizes[0].best.dispatch, sizes[0].best.combine
        best = primary["best"]
    else:
        disp, comb, by_size = overall
        best = {"num_sms": disp.num_sms, "dispatch": disp.as_dict(), "combine": comb.as_dict(),
                "rule": "smallest mean loss against each token count's own best",
                "by_num_tokens": {str(n): v for n, v in by_size.items()}}
        first = by_size[w.num_tokens]
        best["dispatch"]["time_us"], best["combine"]["time_us"] = first["dispatch_us"], first["combine_us"]
        best["total_us"] = first["total_us"]
        if overall_baselines is not None:
            primary["baselines"] = baselines_section(overall_baselines, first["total_us"])
        primary["bandwidth"] = bandwidth(w, sizes[0].traffic, first["dispatch_us"], first["combine_us"])
    assert disp is not None and comb is not None
    nvl = nvl_bytes_needed(disp, comb, w, ep_size)
    hb = w.hidden * max(w.elem_size, 2)
    hint = max(nvl_size_hint(disp, hb, ep_size), nvl_size_hint(comb, hb, ep_size))
    default_hint = max(nvl_size_hint(deepep_default(op, ep_size), hb, ep_size) for op in ("dispatch", "combine"))
    nvl["size_hint"] = hint
    res = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "ep_size": ep_size,
        "workload": w.as_dict(),
        "num_tokens_tuned": [s.workload.num_tokens for s in sizes],
        "best": best,
        **{k: v for k, v in primary.items() if k not in ("best", "num_tokens")},
        "sm_advice": advice,
        "nvl_buffer_bytes": nvl,
        "paste": {
            "torchtitan_turbo": torchtitan_turbo_text(disp, comb, nvl["num_nvl_bytes"]),
            "python_patch": python_patch_text(disp, comb, ep_size),
            "buffer_notes": buffer_notes(nvl["num_nvl_bytes"], hint, default_hint),
        },
        **sglang_config(disp, comb),
    }
    if len(sizes) > 1:
        res["per_num_tokens"] = {str(s.workload.num_tokens): size_section(s) for s in sizes}
    return res
