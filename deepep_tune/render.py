"""Human-facing text from a results dict: the summary tables and what to paste."""

from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate


def _cfg(c: dict[str, int] | None) -> str:
    return "-" if not c else f"({c['nvl_chunk']}, {c['nvl_buffer']})"


def _us(x: float | None) -> str:
    return "failed" if x is None else f"{x:.1f}"


def size_tables(sec: dict[str, Any], best_sms: int) -> list[str]:
    rows = []
    for r in sec["per_num_sms"]:
        mark = "<- best" if r["num_sms"] == best_sms else ""
        rows.append([r["num_sms"], _cfg(r["dispatch"]), _us(r["dispatch_us"]), _cfg(r["combine"]), _us(r["combine_us"]),
                     _us(r["total_us"]), r.get("configs_measured", ""), mark])
    out = [tabulate(rows, headers=["num_sms", "dispatch (chunk, buf)", "dispatch us", "combine (chunk, buf)",
                                   "combine us", "total us", "configs", ""], tablefmt="simple"), ""]
    brows = []
    for name, b in sec["baselines"].items():
        if "skipped" in b:
            brows.append([name, b["dispatch"]["num_sms"], "-", "-", "-", f"skipped: {b['skipped']}"])
        else:
            sp = b.get("speedup")
            verdict = "-" if not sp else (f"tuned is {sp:.2f}x faster" if sp >= 1 else
                                          f"baseline is {1 / sp:.2f}x faster (outside the searched space)")
            brows.append([name, b["dispatch"]["num_sms"], _us(b["dispatch_us"]), _us(b["combine_us"]),
                          _us(b["total_us"]), verdict])
    a2a = sec.get("all_to_all")
    if a2a and "skipped" not in a2a:
        sp = a2a["deepep_speedup"]
        verdict = f"DeepEP is {sp:.2f}x faster" if sp >= 1 else f"all_to_all is {1 / sp:.2f}x faster than DeepEP"
        brows.append(["all_to_all_single", "-", _us(a2a["dispatch_us"]), _us(a2a["combine_us"]), _us(a2a["total_us"]),
                      verdict])
    elif a2a:
        brows.append(["all_to_all_single", "-", "-", "-", "-", f"skipped: {a2a['skipped']}"])
    out.append(tabulate(brows, headers=["baseline", "num_sms", "dispatch us", "combine us", "total us", "speed-up"],
                        tablefmt="simple"))
    bw = sec["bandwidth"]
    out.append("")
    for op in ("dispatch", "combine"):
        if op in bw:
            out.append(f"[bandwidth] {op}: {bw[op]['deepep_gbps']} GB/s by DeepEP's formula (rank 0, counts tokens it "
                       f"keeps); {bw[op]['nvlink_gbps']} GB/s of rows crossing between ranks (per rank)")
    return out


def summary(res: dict[str, Any], emit: bool = False) -> str:
    hw = res["hardware"]
    best = res["best"]
    where = f"{hw.get('device_name')} x{hw.get('num_devices')}"
    if hw.get("colocated"):
        where += f", {res['ep_size']} ranks CO-LOCATED on shared GPU(s): not NVLink numbers"
    lines = [
        f"# deepep-tune {res['tool_version']}  EP{res['ep_size']}  mode={res['mode']}  backend={res['backend']}  [{where}]",
        f"# workload: {res['workload']}" + (f" (--model {res['model']})" if res.get("model") else ""),
        f"# {res['num_measurements']} measurements in {res['wall_s']:.1f} s; times are the median over iterations of "
        "the slowest rank",
        "",
    ]
    sections = res.get("per_num_tokens") or {str(res["workload"]["num_tokens"]): res}
    for n, sec in sections.items():
        if len(sections) > 1:
            lines += [f"## num_tokens={n}: best num_sms={sec['best']['num_sms']}, total {sec['best']['total_us']} us", ""]
        lines += size_tables(sec, sec["best"]["num_sms"]) + [""]
    d, c = best["dispatch"], best["combine"]
    lines.append(f"[best] num_sms={best['num_sms']}  dispatch (nvl_chunk={d['nvl_chunk']}, nvl_buffer={d['nvl_buffer']})  "
                 f"combine (nvl_chunk={c['nvl_chunk']}, nvl_buffer={c['nvl_buffer']})")
    if "by_num_tokens" in best:
        for n, v in best["by_num_tokens"].items():
            lines.append(f"[best] one config for all sizes: at {n} tokens {v['total_us']} us, "
                         f"{v['loss_pct']}% slower than that size's own best")
    else:
        lines.append(f"[best] dispatch {d['time_us']} us + combine {c['time_us']} us = {best['total_us']} us")
    adv = res.get("sm_advice")
    if adv and adv["num_sms"] != best["num_sms"]:
        lines.append(f"[advice] {adv['num_sms']} SMs is within {100 * adv['tolerance']:.0f}% ({adv['slower_than_best_pct']}% "
                     f"slower) and frees {adv['sms_saved']} SMs for compute: {adv['command']}")
    for note in res["paste"]["buffer_notes"]:
        lines.append(f"[buffer] {note}")
    lines += ["", res["paste"]["torchtitan_turbo"], "",
              f"# SGLang: --deepep-config {res['paste'].get('sglang_file', res.get('results_path'))}"]
    if emit:
        lines += ["", json.dumps({"normal_dispatch": res["normal_dispatch"], "normal_combine": res["normal_combine"]}),
                  "", res["paste"]["python_patch"]]
        if adv and adv["num_sms"] != best["num_sms"]:
            lines += ["", f"# With {adv['num_sms']} SMs (advice above):", adv["torchtitan_turbo"]]
    return "\n".join(lines)
