"""Human-facing text from a results dict: the summary table and what to paste."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate


def _cfg(c: dict[str, int] | None) -> str:
    return "-" if not c else f"({c['nvl_chunk']}, {c['nvl_buffer']})"


def _us(x: float | None) -> str:
    return "failed" if x is None else f"{x:.1f}"


def summary(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    best = res["best"]
    where = f"{hw.get('device_name')} x{hw.get('num_devices')}"
    if hw.get("colocated"):
        where += f", {res['ep_size']} ranks CO-LOCATED on shared GPU(s): not NVLink numbers"
    lines = [
        f"# deepep-tune {res['tool_version']}  EP{res['ep_size']}  mode={res['mode']}  backend={res['backend']}  [{where}]",
        f"# workload: {res['workload']}",
        f"# {res['num_measurements']} measurements in {res['wall_s']:.1f} s; times are the slowest rank's median",
        "",
    ]
    rows = []
    for r in res["per_num_sms"]:
        mark = "<- best" if r["num_sms"] == best["num_sms"] else ""
        rows.append([r["num_sms"], _cfg(r["dispatch"]), _us(r["dispatch_us"]), _cfg(r["combine"]), _us(r["combine_us"]),
                     _us(r["total_us"]), mark])
    lines.append(tabulate(rows, headers=["num_sms", "dispatch (chunk, buf)", "dispatch us", "combine (chunk, buf)",
                                         "combine us", "total us", ""], tablefmt="simple"))
    lines.append("")
    brows = []
    for name, b in res["baselines"].items():
        if "skipped" in b:
            brows.append([name, f"{b['dispatch']['num_sms']}", "-", "-", "-", f"skipped: {b['skipped']}"])
        else:
            sp = b.get("speedup")
            brows.append([name, f"{b['dispatch']['num_sms']}", _us(b["dispatch_us"]), _us(b["combine_us"]),
                          _us(b["total_us"]), f"tuned is {sp:.2f}x faster" if sp else "-"])
    lines.append(tabulate(brows, headers=["baseline", "num_sms", "dispatch us", "combine us", "total us", "speed-up"],
                          tablefmt="simple"))
    bw = res["bandwidth"]
    lines.append("")
    for op in ("dispatch", "combine"):
        if op in bw:
            lines.append(f"[bandwidth] {op}: {bw[op]['deepep_gbps']} GB/s by DeepEP's formula (rank 0, counts tokens it "
                         f"keeps); {bw[op]['nvlink_gbps']} GB/s of rows crossing between ranks (per rank)")
    d, c = best["dispatch"], best["combine"]
    lines += [
        "",
        f"[best] num_sms={best['num_sms']}  dispatch (nvl_chunk={d['nvl_chunk']}, nvl_buffer={d['nvl_buffer']}) "
        f"{d['time_us']} us  combine (nvl_chunk={c['nvl_chunk']}, nvl_buffer={c['nvl_buffer']}) {c['time_us']} us  "
        f"total {best['total_us']} us",
        f"[best] NVL buffer needed: {res['nvl_buffer_bytes']['num_nvl_bytes']} bytes per rank",
        "",
        res["paste"]["torchtitan_turbo"],
        "",
        f"# SGLang: --deepep-config {res.get('results_path', 'RESULTS file')}",
    ]
    return "\n".join(lines)
