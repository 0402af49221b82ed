"""Human-facing text from a results dict: the summary tables and what to paste."""

from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate

from .paste import sglang_of

# printed without --emit: the target that reaches any deep_ep.Buffer user
DEFAULT_TARGETS = ("deep_ep_buffer",)


V1_KNOBS = ("num_sms", "nvl_chunk", "nvl_buffer")
SIMULATED = ("reference", "replay")  # backends that measure no GPU
# what a table cell shows for a config: its knobs other than the row's num_sms (DeepEP v1: chunk and buffer)
V1_CELL = "chunk, buf"


def _cfg(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if "nvl_chunk" in c:
        return f"({c['nvl_chunk']}, {c['nvl_buffer']})"
    return "(" + ", ".join(f"{k}={v}" for k, v in c.items()) + ")"


def _knobs_text(res: dict[str, Any], op: str, c: dict[str, Any]) -> str:
    """A config as its knobs (num_sms only where the ops may differ): 'nvl_chunk=8, nvl_buffer=512'."""
    names = (res.get("space") or {}).get("knobs", {}).get(op, V1_KNOBS)
    shared = (res.get("space") or {}).get("shared", ["num_sms"])
    return ", ".join(f"{k}={c[k]}" for k in names if k in c and not (k == "num_sms" and k in shared))


def _us(x: float | None) -> str:
    return "failed" if x is None else f"{x:.1f}"


def size_tables(sec: dict[str, Any], best_sms: int) -> list[str]:
    rows = []
    for r in sec["per_num_sms"]:
        mark = "<- best" if r["num_sms"] == best_sms else ""
        rows.append([r["num_sms"], _cfg(r["dispatch"]), _us(r["dispatch_us"]), _cfg(r["combine"]), _us(r["combine_us"]),
                     _us(r["total_us"]), r.get("configs_measured", ""), mark])
    cell = f" ({V1_CELL})" if any(r["dispatch"] and "nvl_chunk" in r["dispatch"] for r in sec["per_num_sms"]) else ""
    out = [tabulate(rows, headers=["num_sms", f"dispatch{cell}", "dispatch us", f"combine{cell}",
                                   "combine us", "total us", "configs", ""], tablefmt="simple"), ""]
    out.append(tabulate(baseline_rows(sec), headers=["baseline", "num_sms", "dispatch us", "combine us", "total us",
                                                     "speed-up of the pick"], tablefmt="simple"))
    bw = sec["bandwidth"]
    out.append("")
    for op in ("dispatch", "combine"):
        if op in bw:
            b = bw[op]
            line = (f"[bandwidth] {op}: {b['deepep_gbps']} GB/s by DeepEP's formula (rank 0, counts tokens it keeps); "
                    f"{b['nvlink_gbps']} GB/s of rows crossing between ranks (per rank, forward call)")
            if "fraction_of_link" in b:
                line += f" = {100 * b['fraction_of_link']:.0f}% of the link's {bw['link_gbps_per_direction']:.0f} GB/s"
            if "fraction_of_nccl" in b:
                line += f", {100 * b['fraction_of_nccl']:.0f}% of NCCL all_to_all's {b['nccl_all_to_all_gbps']} GB/s"
            out.append(line)
    return out


def baseline_rows(sec: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, b in sec["baselines"].items():
        if "skipped" in b:
            rows.append([name, b["dispatch"]["num_sms"], "-", "-", "-", f"skipped: {b['skipped']}"])
            continue
        sp = b.get("speedup")
        verdict = "-" if not sp else (f"{sp:.2f}x" if sp >= 1 else f"{sp:.2f}x (baseline faster: outside the space)")
        if sp and "speedup_p10" in b:
            verdict += f" (p10-p90 {b['speedup_p10']:.2f}-{b['speedup_p90']:.2f}, interleaved)"
        rows.append([name, b["dispatch"]["num_sms"], _us(b["dispatch_us"]), _us(b["combine_us"]), _us(b["total_us"]),
                     verdict])
    a2a = sec.get("all_to_all")
    if a2a and "skipped" not in a2a:
        sp = a2a.get("deepep_speedup")
        verdict = "-" if not sp else (f"DeepEP forward is {sp:.2f}x faster" if sp >= 1 else
                                      f"all_to_all is {1 / sp:.2f}x faster than DeepEP forward")
        rows.append(["all_to_all_single", "-", _us(a2a["dispatch_us"]), _us(a2a["combine_us"]), _us(a2a["total_us"]),
                     verdict])
    elif a2a:
        rows.append(["all_to_all_single", "-", "-", "-", "-", f"skipped: {a2a['skipped']}"])
    return rows


def comparison_lines(cmp: dict[str, Any] | None) -> list[str]:
    if not cmp:
        return []
    rows = []
    for name, c in cmp["candidates"].items():
        t, sp = c.get("total_us"), c.get("speedup_of_pick")
        rows.append([name, t and f"{t['median']:.1f} ({t['p10']:.1f}-{t['p90']:.1f})",
                     sp and f"{sp['median']:.3f} ({sp['p10']:.3f}-{sp['p90']:.3f})" or "-"])
    return [f"[compare] {cmp['rounds']} interleaved rounds at the first token count", "",
            tabulate(rows, headers=["candidate", "total us median (p10-p90)", "candidate / pick (p10-p90)"],
                     tablefmt="simple"), ""]


def layer_lines(layer: dict[str, Any] | None) -> list[str]:
    if not layer:
        return []
    if "skipped" in layer:
        return [f"[layer] skipped: {layer['skipped']}", ""]
    out = [f"[layer] MoE layer forward + backward, {layer.get('rounds')} interleaved rounds ({layer.get('what', '')})"]
    shape = layer.get("shape") or {}
    if shape:
        out.append(f"[layer] expert FFN {shape.get('moe_intermediate')}, shared experts {shape.get('num_shared_experts')}"
                   f" x {shape.get('shared_intermediate')} (from {layer.get('sizes_from', 'flags')})")
    for sched, table in layer["schedules"].items():
        rows = [[name, layer.get("num_sms", {}).get(name), f"{v['median_ms']:.3f}", f"{v['p10_ms']:.3f}-{v['p90_ms']:.3f}",
                 v.get("speedup_vs_reference") and f"{v['speedup_vs_reference']:.3f}x" or "-"]
                for name, v in table.items()]
        out += ["", f"schedule: {sched}", tabulate(rows, headers=["candidate", "num_sms", "median ms", "p10-p90 ms",
                                                                  f"vs {layer.get('reference', 'reference')}"],
                                                   tablefmt="simple")]
    for f in layer.get("fastest", {}).values():
        out.append(f"[layer] {f['verdict']}")
    if layer.get("note"):
        out.append(f"[layer] {layer['note']}")
    return out + [""]


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
        f"the slowest rank; objective {res.get('objective', 'forward')}"
        + (" (dispatch = forward dispatch + backward cached dispatch, combine = forward + backward combine)"
           if res.get("objective") == "train" else ""),
        "",
    ]
    sections = res.get("per_num_tokens") or {str(res["workload"]["num_tokens"]): res}
    for n, sec in sections.items():
        if len(sections) > 1:
            lines += [f"## num_tokens={n}: best num_sms={sec['best']['num_sms']}, total {sec['best']['total_us']} us", ""]
        lines += size_tables(sec, sec["best"]["num_sms"]) + [""]
    lines += comparison_lines(res.get("comparison")) + layer_lines(res.get("layer_check"))
    d, c = best["dispatch"], best["combine"]
    lines.append(f"[best] num_sms={best['num_sms']}  dispatch ({_knobs_text(res, 'dispatch', d)})  "
                 f"combine ({_knobs_text(res, 'combine', c)})  objective={res.get('objective')}")
    if "by_num_tokens" in best:
        for n, v in best["by_num_tokens"].items():
            lines.append(f"[best] one config for all sizes: at {n} tokens {v['total_us']} us, "
                         f"{v['loss_pct']}% slower than that size's own best")
    else:
        lines.append(f"[best] dispatch {d['time_us']} us + combine {c['time_us']} us = {best['total_us']} us")
    adv = res.get("sm_advice")
    if adv and adv["num_sms"] != best["num_sms"]:
        if "layer_slower_than_fastest_pct" in adv:
            why = (f"its MoE layer forward + backward is within {100 * adv['tolerance']:.0f}% of the fastest "
                   f"({adv['layer_slower_than_fastest_pct']}% slower; communication alone "
                   f"{adv['slower_than_best_pct']}% slower)")
        else:
            why = (f"its dispatch + combine is within {100 * adv['tolerance']:.0f}% "
                   f"({adv['slower_than_best_pct']}% slower)")
        lines.append(f"[advice] {adv['num_sms']} SMs: {why}, and it frees {adv['sms_saved']} SMs for compute: "
                     f"{adv['command']}")
    return "\n".join(lines + paste_lines(res, emit))


def paste_lines(res: dict[str, Any], emit: bool) -> list[str]:
    lines = [f"[buffer] {note}" for note in res["paste"].get("buffer_notes", [])]
    paste = {k: v for k, v in res["paste"].items() if k not in ("buffer_notes", "sglang_file")}
    shown = paste if emit else {k: v for k, v in paste.items() if k in DEFAULT_TARGETS or k == "note"}
    for text in shown.values():
        lines += ["", text]
    if "normal_dispatch" in res:
        lines += ["", f"# SGLang: --deepep-config {res['paste'].get('sglang_file', res.get('results_path'))}"]
        if not emit:
            lines.append(f"# every paste target (torchtitan fork versions, SGLang, Primus): --emit, or 'paste' in "
                         f"{res.get('results_path')}")
    return lines


# --- OPTIMAL_CONFIGS.md -------------------------------------------------------------------------------------

def _optimal_section(path: str, res: dict[str, Any]) -> list[str]:
    hw, w, best = res["hardware"], res["workload"], res["best"]
    if res["backend"] in SIMULATED:
        kind = f"{res['backend']} backend: not a GPU measurement"
    elif res.get("colocated"):
        kind = (f"CO-LOCATED: {res['ep_size']} ranks share {hw.get('num_devices')} GPU(s) under MPS; no NVLink "
                "traffic, a functional check, not a config to use on a real node")
    else:
        kind = "one rank per GPU"
    d, c = best["dispatch"], best["combine"]
    library = res.get("library", "deepep-v1")
    lines = [
        f"### EP{res['ep_size']} on {hw.get('device_name')} x{hw.get('num_devices')} ({kind})"
        + ("" if library == "deepep-v1" else f": {library}"),
        "",
        f"- source: `{path}` (log `{res['log']}`), mode `{res['mode']}`, objective `{res.get('objective', 'forward')}`, "
        f"{res['num_measurements']} measurements, {res['started']}",
        f"- software: torch {res['software'].get('torch')}, deep_ep {res['software'].get('deep_ep')}, "
        f"driver {hw.get('driver')}",
        f"- workload: {w['num_tokens']} tokens/rank, hidden {w['hidden']}, top-{w['num_topk']}, {w['num_experts']} "
        f"experts, {w['dispatch_dtype']} dispatch" + (f" (model {res['model']})" if res.get("model") else ""),
        f"- best: num_sms={best['num_sms']}, dispatch ({_knobs_text(res, 'dispatch', d)}) "
        f"{d.get('time_us')} us, combine ({_knobs_text(res, 'combine', c)}) {c.get('time_us')} us",
        "",
        "Best config at each num_sms (for an SM budget):",
        "",
    ]
    rows = [[r["num_sms"], _cfg(r["dispatch"]), r["dispatch_us"], _cfg(r["combine"]), r["combine_us"], r["total_us"]]
            for r in res["per_num_sms"]]
    cell = " (chunk, buffer)" if library == "deepep-v1" else ""
    lines.append(tabulate(rows, headers=["num_sms", f"dispatch{cell}", "dispatch us", f"combine{cell}",
                                         "combine us", "total us"], tablefmt="github"))
    lines += ["", tabulate(baseline_rows(res), headers=["baseline", "num_sms", "dispatch us", "combine us", "total us",
                                                        "speed-up of the pick"], tablefmt="github"), ""]
    bw = res.get("bandwidth", {})
    for op in ("dispatch", "combine"):
        b = bw.get(op)
        if b and "fraction_of_link" in b:
            lines.append(f"- {op}: {b['nvlink_gbps']} GB/s of rows crossing NVLink per rank = "
                         f"{100 * b['fraction_of_link']:.0f}% of {bw['link_gbps_per_direction']:.0f} GB/s"
                         + (f", {100 * b['fraction_of_nccl']:.0f}% of NCCL all_to_all ({b['nccl_all_to_all_gbps']} GB/s)"
                            if "fraction_of_nccl" in b else ""))
    if res.get("schema_version", 1) >= 2:
        paste = {k: v for k, v in res["paste"].items() if k not in ("buffer_notes", "sglang_file")}
        lines += ["", "Paste targets (each says what its consumer does with it):", ""]
        for text in paste.values():
            lines += ["```", text, "```", ""]
    else:
        lines += ["", "(Written by an earlier version whose framework paste targets were not all true: only the "
                      "SGLang config below is shown; re-run the tool for the others.)", ""]
    if "normal_dispatch" in res:
        lines += ["SGLang `--deepep-config`:", "", "```json", json.dumps(sglang_of(res)), "```", ""]
    return lines


def optimal_configs_markdown(results: list[tuple[str, dict[str, Any]]]) -> str:
    """OPTIMAL_CONFIGS.md from results files: real one-rank-per-GPU runs first, then the rest, labelled."""
    real = [(p, r) for p, r in results if r["backend"] not in SIMULATED and not r.get("colocated")]
    other = [(p, r) for p, r in results if (p, r) not in real]
    lines = ["# Optimal DeepEP intranode configs", "",
             "Generated by `python3 -m deepep_tune.optimal` from results files written by this tool; every number",
             "below was measured by deepep-tune on the hardware named in its section.", ""]
    if real:
        lines += ["## Real nodes (one rank per GPU, NVLink)", ""]
        for p, r in real:
            lines += _optimal_section(p, r)
    else:
        lines += ["**No multi-GPU NVLink node has been measured yet.** Run `./run.sh 4 full` (or 8) on your node.", ""]
    if other:
        lines += ["## Co-located and other runs (functional checks: not configs to use on a real node)", ""]
        for p, r in other:
            lines += _optimal_section(p, r)
    return "\n".join(lines).rstrip() + "\n"
