"""DeepEP v1, DeepEP V2 and HybridEP side by side, from results files (every cell is a value from a file).

    python3 -m deepep_tune.report.libraries RESULTS.json [RESULTS.json ...] [--markdown]

One table: rows grouped by shape (model, hidden, top-k / experts, tokens per rank, dispatch dtype, EP size,
objective), then by hardware and library; per results file its baselines (v1 as shipped, V2's model, HybridEP's
defaults and consumers' settings, picks it was --compare'd with) and its tuned pick, with the search-time
dispatch / combine / total, the final interleaved comparison and the MoE layer check per schedule."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

from ..record.results import library_of, read_results
from .render import SIMULATED

LIBRARIES = {"deepep-v1": "DeepEP v1", "deepep-v2": "DeepEP V2", "hybridep": "HybridEP"}
HEADERS = ["shape", "library", "hardware", "run", "candidate", "SMs d/c", "dispatch us", "combine us", "total us",
           "final dispatch us", "final combine us", "final total us (p10-p90)", "pick speed-up (p10-p90)"]
REPEATED = 4  # shape, library, hardware, run: printed on the first row of their block only
PICK = "pick"

Files = list[tuple[str, dict[str, Any]]]


@dataclass
class Notes:
    """Numbered footnotes, one number per distinct text, in order of first use."""

    texts: list[str] = field(default_factory=list)

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    runs: list[str]  # one line per results file
    candidates: list[str]  # 'name: description' of every baseline
    notes: list[str]


def _us(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def _spread(q: dict[str, Any] | None, fmt: str, unit: str = "") -> str:
    """'median (p10-p90)' of a {median, p10, p90} entry, '-' without one."""
    if not q or q.get("median") is None:
        return "-"
    return f"{q['median']:{fmt}}{unit} ({q['p10']:{fmt}}-{q['p90']:{fmt}})"


def shape_key(res: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two results files' times comparable: the workload's shape, the EP size and the objective."""
    w = res.get("workload") or {}
    return (w.get("hidden"), w.get("num_topk"), w.get("num_experts"), w.get("num_tokens"), w.get("dispatch_dtype"),
            w.get("expert_alignment") or 1, res.get("ep_size"), res.get("objective", "forward"))


def shape_label(key: tuple[Any, ...], models: list[str]) -> str:
    hidden, topk, experts, tokens, dtype, align, ep, objective = key
    name = "/".join(models) or "model not recorded"
    return (f"{name} h{hidden} top{topk}/{experts}e T{tokens} {dtype}" + (f" align{align}" if align != 1 else "")
            + f" EP{ep} {objective}")


def short_version(deep_ep: str) -> str:
    """The library's version string without the filesystem paths it was loaded from."""
    return re.sub(r"\s*\(/[^)]*\)|,\s*/[^,)]*", "", deep_ep).strip()


def library_label(res: dict[str, Any]) -> str:
    lib = library_of(res)
    version = (res.get("software") or {}).get("deep_ep")
    return f"{LIBRARIES.get(lib, lib)} @ {short_version(version) if version else 'version not recorded'}"


def hardware_label(res: dict[str, Any]) -> str:
    hw = res.get("hardware") or {}
    out = f"{hw.get('device_name', 'device not recorded')} x{hw.get('num_devices', '?')}"
    if res.get("colocated") or hw.get("colocated"):
        out += ", co-located"
    if res.get("backend") in SIMULATED:
        out += f", {res['backend']} backend (simulated)"
    return out


def run_label(path: str) -> str:
    """The results file's folder and its parent (results/<hardware>/<run>/RESULTS_*.json -> <hardware>/<run>)."""
    parts = os.path.normpath(os.path.dirname(os.path.abspath(path))).split(os.sep)
    return "/".join(parts[-2:])


def _sms(d: dict[str, Any] | None, c: dict[str, Any] | None) -> str:
    ds, cs = (d or {}).get("num_sms"), (c or {}).get("num_sms")
    if ds is None and cs is None:
        return "-"
    return str(ds) if ds == cs else f"{ds if ds is not None else '-'}/{cs if cs is not None else '-'}"


def schedules_of(files: Files) -> list[str]:
    """Every layer-check schedule in the files, in order of first appearance."""
    out: list[str] = []
    for _, res in files:
        for s in ((res.get("layer_check") or {}).get("schedules") or {}):
            if s not in out:
                out.append(s)
    return out


def layer_cells(res: dict[str, Any], name: str, schedules: list[str], notes: Notes) -> list[str]:
    """Per schedule: the candidate's median layer ms and its speed-up against the layer check's reference."""
    if "layer_check" not in res:
        return [f"- {notes.mark('no layer_check in the results file (an earlier version of the tool)')}"
                ] * len(schedules)
    layer = res["layer_check"]
    if layer is None:
        return [f"- {notes.mark('layer_check is null: tuned without --layer-check')}"] * len(schedules)
    if "skipped" in layer:
        return [f"- {notes.mark('layer check skipped: ' + str(layer['skipped']))}"] * len(schedules)
    why = (layer.get("skipped_candidates") or {}).get(name)
    suspect = f" {notes.mark('layer check: ' + str(layer['note']))}" if layer.get("note") else ""
    cells = []
    for s in schedules:
        v = (layer.get("schedules") or {}).get(s, {}).get(name)
        if v and v.get("median_ms") is not None:
            sp = v.get("speedup_vs_reference")
            cells.append(f"{v['median_ms']:.3f} ms" + (f" ({sp:.3f}x)" if sp is not None else "") + suspect)
        elif why:
            cells.append(f"- {notes.mark(f'{name} skipped in the layer check: {why}')}")
        elif s not in (layer.get("schedules") or {}):
            cells.append(f"- {notes.mark(f'schedule {s} not in this layer check')}")
        else:
            cells.append(f"- {notes.mark(name + ' is not among the layer check candidates')}")
    return cells


def candidate_rows(res: dict[str, Any], schedules: list[str], notes: Notes) -> list[list[str]]:
    """The file's baselines, then candidates only its final comparison timed (picks it was compared with), then
    its pick: [candidate, SMs, dispatch, combine, total, final dispatch, final combine, final total, speed-up,
    layer per schedule]."""
    final = (res.get("comparison") or {}).get("candidates") or {}
    bases = res.get("baselines") or {}
    rows = []

    def finals(name: str) -> list[str]:
        f = final.get(name) or {}
        sp = "reference" if name == PICK and f else _spread(f.get("speedup_of_pick"), ".3f", "x")
        return [_us(f.get("dispatch_us")), _us(f.get("combine_us")), _spread(f.get("total_us"), ".2f"), sp]

    for name, b in bases.items():
        label = name + (f" {notes.mark(f'{name} skipped: ' + str(b['skipped']))}" if "skipped" in b else "")
        rows.append([label, _sms(b.get("dispatch"), b.get("combine")), _us(b.get("dispatch_us")),
                     _us(b.get("combine_us")), _us(b.get("total_us"))] + finals(name)
                    + layer_cells(res, name, schedules, notes))
    for name, f in final.items():
        if name == PICK or name in bases:
            continue
        src = f" from {f['source']}" if f.get("source") else ""
        label = f"{name} {notes.mark(f'{name}: a pick compared{src}; timed in the final comparison only')}"
        rows.append([label, _sms(f.get("dispatch"), f.get("combine")), "-", "-", "-"] + finals(name)
                    + layer_cells(res, name, schedules, notes))
    best = res["best"]
    d, c = best["dispatch"], best["combine"]
    rows.append([f"{PICK} (tuned)", _sms(d, c), _us(d.get("time_us")), _us(c.get("time_us")),
                 _us(best.get("total_us"))] + finals(PICK) + layer_cells(res, PICK, schedules, notes))
    return rows


def run_line(path: str, res: dict[str, Any]) -> str:
    """The legend line of one results file: where it came from and what produced it."""
    sw, hw = res.get("software") or {}, res.get("hardware") or {}
    tuned = res.get("num_tokens_tuned") or []
    cmp, layer = res.get("comparison"), res.get("layer_check")
    parts = [f"{run_label(path)}: {path}", f"library {library_of(res)}, deep_ep {sw.get('deep_ep', '-')}",
             f"torch {sw.get('torch', '-')}, CUDA {sw.get('cuda', '-')}, driver {hw.get('driver', '-')}",
             f"mode {res.get('mode', '-')}, tool {res.get('tool_version', '-')}, started {res.get('started', '-')}"]
    if len(tuned) > 1:
        parts.append(f"one pick for num_tokens {tuned}, times at {tuned[0]}")
    if cmp:
        parts.append(f"final comparison {cmp.get('rounds')} interleaved rounds")
    if layer and "skipped" not in layer:
        parts.append(f"layer check {layer.get('rounds')} rounds vs {layer.get('reference')}")
    return "; ".join(parts)


def _order(files: Files) -> list[tuple[tuple[Any, ...], Files]]:
    """Files grouped by shape (groups in order of first appearance), each group ordered by hardware (order of
    first appearance), then library (v1, V2, HybridEP, others), then as given."""
    groups: dict[tuple[Any, ...], Files] = {}
    for p, r in files:
        groups.setdefault(shape_key(r), []).append((p, r))
    hw_order = list(dict.fromkeys(hardware_label(r) for _, r in files))
    libs = list(LIBRARIES)

    def rank(item: tuple[int, tuple[str, dict[str, Any]]]) -> tuple[int, int, int]:
        i, (_, r) = item
        lib = library_of(r)
        return hw_order.index(hardware_label(r)), libs.index(lib) if lib in libs else len(libs), i

    return [(k, [f for _, f in sorted(enumerate(g), key=rank)]) for k, g in groups.items()]


def libraries_table(files: Files) -> Table:
    """The side-by-side table of (path, results dict) pairs."""
    notes, schedules = Notes(), schedules_of(files) or [""]  # no schedule anywhere: one column for the reasons
    headers = HEADERS + [f"layer {s} ms (x ref)".replace("  ", " ") for s in schedules]
    rows, runs, descriptions = [], [], {}
    for key, group in _order(files):
        label = shape_label(key, list(dict.fromkeys(str(r["model"]) for _, r in group if r.get("model"))))
        for path, res in group:
            runs.append(run_line(path, res))
            for name, b in (res.get("baselines") or {}).items():
                if b.get("description"):
                    descriptions.setdefault(f"{name}: {b['description']}", None)
            head = [label, library_label(res), hardware_label(res), run_label(path)]
            for row in candidate_rows(res, schedules, notes):
                rows.append(head + row)
    return Table(headers, rows, runs, list(descriptions), notes.texts)


def _blank_repeats(rows: list[list[str]]) -> list[list[str]]:
    """Leave shape, library, hardware and run empty where they repeat the row above within the same block."""
    out, prev = [], None
    for row in rows:
        shown = list(row)
        if prev is not None:
            for i in range(REPEATED):
                if row[: i + 1] == prev[: i + 1]:
                    shown[i] = ""
        out.append(shown)
        prev = row
    return out


COLUMNS = ("Columns: dispatch/combine/total us are the search's medians (with objective train each is forward + "
           "backward); final = the interleaved re-timing (per-op median, total median (p10-p90)); pick speed-up = "
           "candidate / pick per round; layer = MoE layer median ms, (x ref) = the layer check's reference / "
           "candidate per round. '-': not in the file.")


def render(files: Files, markdown: bool = False) -> str:
    t = libraries_table(files)
    lines = [tabulate(_blank_repeats(t.rows), headers=t.headers, tablefmt="github" if markdown else "simple",
                      disable_numparse=True), ""]
    bullet = "- " if markdown else ""
    lines += [f"{bullet}{COLUMNS}", ""]
    lines += ["Runs:", ""] + [f"{bullet}{x}" for x in t.runs] + [""]
    lines += ["Candidates:", ""] + [f"{bullet}{x}" for x in t.candidates] + [""]
    lines += ["Notes:", ""] + [f"{bullet}[{i}] {n}" for i, n in enumerate(t.notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def load(paths: list[str]) -> Files:
    """(path, results) per file; ValueError with one line naming the file that is not a results file."""
    out = []
    for p in paths:
        try:
            res = read_results(p)
        except OSError as e:
            raise ValueError(f"{p}: cannot read ({e.strerror or e})") from None
        best = res.get("best")
        if not isinstance(best, dict) or not all(isinstance(best.get(op), dict) for op in ("dispatch", "combine")):
            raise ValueError(f"{p}: not a deepep-tune results file (best lacks dispatch/combine)")
        out.append((p, res))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DeepEP v1, DeepEP V2 and HybridEP side by side from results files")
    ap.add_argument("results", nargs="+", help="RESULTS_*.json files written by deepep-tune (any library)")
    ap.add_argument("--markdown", action="store_true", help="a GitHub markdown table")
    a = ap.parse_args(argv)
    try:
        text = render(load(a.results), a.markdown)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:
        print(f"error: a results file has an unexpected layout ({type(e).__name__}: {e}); pass RESULTS_*.json "
              "files written by deepep-tune", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
