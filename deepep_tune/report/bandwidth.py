"""Bandwidth of the pick: DeepEP's own formula, the bytes that really cross NVLink, and NCCL's all_to_all for
the same rows."""

from __future__ import annotations

import math
from typing import Any

from ..deepep.routing import Traffic
from ..deepep.workload import Workload

# NVLink 4 (H100/H200 SXM): 18 links x 25 GB/s per direction.
LINK_GBPS_PER_DIRECTION = {"H100": 450.0, "H200": 450.0}


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


