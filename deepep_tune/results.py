"""The results file: provenance, the answer, the per-num_sms trade-off, baselines and paste targets.
Written atomically; top-level normal_dispatch/normal_combine make it loadable by SGLang as-is."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from .consumers import sglang_config, torchtitan_turbo_text
from .search import SmsRow
from .space import TuneConfig, align, combine_nvl_bytes, dispatch_nvl_bytes
from .workload import Traffic, Workload

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
            "combine_us": _r(r.combine_us), "total_us": _r(r.total_us)}


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 2)


def build_results(*, meta: dict[str, Any], workload: Workload, ep_size: int, best: SmsRow, rows: list[SmsRow],
                  baselines: list[Baseline], traffic: Traffic, spread: dict[str, Any]) -> dict[str, Any]:
    assert best.dispatch is not None and best.combine is not None
    nvl = nvl_bytes_needed(best.dispatch, best.combine, workload, ep_size)
    base_out = {}
    for b in baselines:
        entry: dict[str, Any] = {"description": b.description, "dispatch": b.dispatch.as_dict(),
                                 "combine": b.combine.as_dict()}
        if b.skipped:
            entry["skipped"] = b.skipped
        else:
            total = b.total_us
            entry.update(dispatch_us=_r(b.dispatch_us), combine_us=_r(b.combine_us), total_us=_r(total),
                         speedup=round(total / best.total_us, 3) if total is not None and math.isfinite(total) else None)
        base_out[b.name] = entry
    return {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "ep_size": ep_size,
        "workload": workload.as_dict(),
        "best": {
            "num_sms": best.num_sms,
            "dispatch": {**best.dispatch.as_dict(), "time_us": _r(best.dispatch_us), **spread.get("dispatch", {})},
            "combine": {**best.combine.as_dict(), "time_us": _r(best.combine_us), **spread.get("combine", {})},
            "total_us": _r(best.total_us),
        },
        "per_num_sms": [_row(r) for r in rows],
        "baselines": base_out,
        "nvl_buffer_bytes": nvl,
        "bandwidth": bandwidth(workload, traffic, best.dispatch_us, best.combine_us),
        "paste": {"torchtitan_turbo": torchtitan_turbo_text(best.dispatch, best.combine, nvl["num_nvl_bytes"])},
        **sglang_config(best.dispatch, best.combine),
    }
