"""The three libraries side by side (report/libraries.py): every cell is the value in its results file, rows are
grouped by shape, skipped layer checks show '-' with the reason in a footnote, and the command line refuses a
file that is not a results file with one line and a non-zero exit."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
from _helpers import ROOT

from deepep_tune.record.results import write_json_atomic
from deepep_tune.report.libraries import main, render

V1 = "results/h200-nvlink/ep2_deepseekv3_full_race_layer/RESULTS_EP2.json"
V2 = "results/h200-nvlink/v2_deepseekv3_quick_layer/RESULTS_EP2_deepep-v2.json"
HYB = "results/h200-nvlink/hybridep_deepseekv3_quick_layer/RESULTS_EP2_hybridep.json"
QWEN = "results/h100-nvlink/ep2_qwen3-30b-a3b_full/RESULTS_EP2.json"
FILLED = ("shape", "library", "hardware", "run")  # left empty where they repeat the row above


def _res(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return json.load(f)


def _copy(tmp_path, rel, run, edit=None):
    """A committed results file in tmp_path/<hw>/<run>/, optionally edited, written by the results writer."""
    path = str(tmp_path / "h200-nvlink" / run / os.path.basename(rel))
    res = copy.deepcopy(_res(rel))
    if edit:
        edit(res)
    write_json_atomic(path, res)
    return path


def _table(text):
    """The markdown table as one dict per row (header -> cell), the blank repeated cells filled from above."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    headers, rows, prev = split[0], [], {}
    for cells in split[2:]:
        row = dict(zip(headers, cells))
        for k in FILLED:
            row[k] = row[k] or prev.get(k, "")
        rows.append(row)
        prev = row
    return rows


def _row(rows, run_suffix, candidate):
    hits = [r for r in rows if r["run"].endswith(run_suffix) and r["candidate"].split(" [")[0] == candidate]
    assert len(hits) == 1, (run_suffix, candidate, rows)
    return hits[0]


def _notes(text):
    """{'[n]': note text} from the Notes section."""
    out = {}
    for ln in text.split("Notes:", 1)[1].splitlines():
        ln = ln.lstrip("- ").strip()
        if ln.startswith("["):
            mark, _, note = ln.partition(" ")
            out[mark] = note
    return out


def _load(path):
    """(path, results) for a committed file (relative to the repository) or a written copy (absolute)."""
    with open(path if os.path.isabs(path) else os.path.join(ROOT, path)) as f:
        return path, json.load(f)


def _render(paths):
    return render([_load(p) for p in paths], markdown=True)


def test_cells_are_the_values_in_the_files():
    text = _render([V1, V2, HYB])
    rows = _table(text)
    for rel, run in ((V1, "ep2_deepseekv3_full_race_layer"), (V2, "v2_deepseekv3_quick_layer"),
                     (HYB, "hybridep_deepseekv3_quick_layer")):
        res = _res(rel)
        best, final = res["best"], res["comparison"]["candidates"]
        pick = _row(rows, run, "pick (tuned)")
        assert pick["dispatch us"] == f"{best['dispatch']['time_us']:.2f}"
        assert pick["combine us"] == f"{best['combine']['time_us']:.2f}"
        assert pick["total us"] == f"{best['total_us']:.2f}"
        assert pick["final dispatch us"] == f"{final['pick']['dispatch_us']:.2f}"
        assert pick["final combine us"] == f"{final['pick']['combine_us']:.2f}"
        t = final["pick"]["total_us"]
        assert pick["final total us (p10-p90)"] == f"{t['median']:.2f} ({t['p10']:.2f}-{t['p90']:.2f})"
        assert pick["pick speed-up (p10-p90)"] == "reference"
        d, c = best["dispatch"]["num_sms"], best["combine"]["num_sms"]
        assert pick["SMs d/c"] == (str(d) if d == c else f"{d}/{c}")
        for name, b in res["baselines"].items():
            row = _row(rows, run, name)
            assert (row["dispatch us"], row["combine us"], row["total us"]) == (
                f"{b['dispatch_us']:.2f}", f"{b['combine_us']:.2f}", f"{b['total_us']:.2f}")
            sp = final[name]["speedup_of_pick"]
            assert row["pick speed-up (p10-p90)"] == f"{sp['median']:.3f}x ({sp['p10']:.3f}-{sp['p90']:.3f})"
            assert row["final dispatch us"] == f"{final[name]['dispatch_us']:.2f}"
    # the libraries' baselines are all there: v1 as shipped, V2's model both ways, HybridEP's default and torchtitan's
    names = {r["candidate"].split(" [")[0] for r in rows}
    assert {"deepep_default_20sms", "v2_model_overlap", "v2_model_no_overlap", "hybridep_default",
            "torchtitan_16sms"} <= names
    # the HybridEP pick runs different SM counts per op: dispatch first, combine second
    best = _res(HYB)["best"]
    assert best["dispatch"]["num_sms"] != best["combine"]["num_sms"]
    assert _row(rows, "hybridep_deepseekv3_quick_layer", "pick (tuned)")["SMs d/c"] == \
        f"{best['dispatch']['num_sms']}/{best['combine']['num_sms']}"


def test_a_compared_pick_has_only_final_comparison_cells():
    rows = _table(_render([V1]))
    name = "full_pick:ep2_deepseekv3_full_norace"
    row, f = _row(rows, "ep2_deepseekv3_full_race_layer", name), _res(V1)["comparison"]["candidates"][name]
    assert (row["dispatch us"], row["combine us"], row["total us"]) == ("-", "-", "-")
    assert row["final dispatch us"] == f"{f['dispatch_us']:.2f}" and row["SMs d/c"] == "128"


def test_each_library_labelled_with_its_version_and_hardware():
    text = _render([V1, V2, HYB])
    rows = _table(text)
    libs = {r["run"].split("/")[-1]: (r["library"], r["hardware"]) for r in rows}
    assert libs["ep2_deepseekv3_full_race_layer"] == ("DeepEP v1 @ tokenspeed-deepep 1.2.1.post20251110",
                                                      "NVIDIA H200 x2")
    assert libs["v2_deepseekv3_quick_layer"][0] == "DeepEP V2 @ deep_ep 2.1.0 (V2 ElasticBuffer, commit dd758ca)"
    assert libs["hybridep_deepseekv3_quick_layer"][0] == "HybridEP @ hybrid-ep 94a9f8f"
    for rel in (V1, V2, HYB):  # the full version string (with where it was loaded from) in the legend
        assert _res(rel)["software"]["deep_ep"] in text


def test_rows_grouped_by_shape_then_library(tmp_path):
    more_tokens = _copy(tmp_path, V2, "v2_8192", lambda r: r["workload"].update(num_tokens=8192))
    # given out of order: Qwen3 first, the V2 run at another token count in the middle
    text = _render([QWEN, HYB, more_tokens, V2, V1])
    lines = [ln for ln in text.splitlines() if ln.startswith("|")][2:]
    shapes = [ln.strip("|").split("|")[0].strip() for ln in lines]
    labels = [s for s in shapes if s]
    assert labels == ["Qwen3-30B-A3B h2048 top8/128e T4096 bf16 EP2 train",
                      "DeepSeek-V3 h7168 top8/256e T4096 bf16 EP2 train",
                      "DeepSeek-V3 h7168 top8/256e T8192 bf16 EP2 train"]  # each shape once, in order of first use
    rows = _table(text)
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r["run"].split("/")[-1])
    assert set(by_shape["DeepSeek-V3 h7168 top8/256e T4096 bf16 EP2 train"]) == {
        "ep2_deepseekv3_full_race_layer", "v2_deepseekv3_quick_layer", "hybridep_deepseekv3_quick_layer"}
    assert set(by_shape["DeepSeek-V3 h7168 top8/256e T8192 bf16 EP2 train"]) == {"v2_8192"}
    assert set(by_shape["Qwen3-30B-A3B h2048 top8/128e T4096 bf16 EP2 train"]) == {"ep2_qwen3-30b-a3b_full"}
    runs = by_shape["DeepSeek-V3 h7168 top8/256e T4096 bf16 EP2 train"]
    firsts = list(dict.fromkeys(runs))  # within a shape: v1, then V2, then HybridEP, whatever the argument order
    assert firsts == ["ep2_deepseekv3_full_race_layer", "v2_deepseekv3_quick_layer", "hybridep_deepseekv3_quick_layer"]


def test_layer_check_cells_and_the_reason_when_skipped(tmp_path):
    skipped = _copy(tmp_path, HYB, "hyb_layer_skipped", lambda r: r.update(
        layer_check={"skipped": "the MoE layer check drives deep_ep.Buffer's API"}))
    no_layer = _copy(tmp_path, V2, "v2_no_layer", lambda r: r.update(layer_check=None))
    text = _render([V1, no_layer, skipped])
    rows, notes = _table(text), _notes(text)
    layer = _res(V1)["layer_check"]
    assert list(layer["schedules"]) == ["sequential", "overlap", "forward_only"]
    for sched, table in layer["schedules"].items():
        for name in ("pick", "deepep_default_20sms", "community_24_8_256"):
            cand = "pick (tuned)" if name == "pick" else name
            v = table[name]
            cell = _row(rows, "ep2_deepseekv3_full_race_layer", cand)[f"layer {sched} ms (x ref)"]
            assert cell == f"{v['median_ms']:.3f} ms ({v['speedup_vs_reference']:.3f}x)"
    # deepep_default is a baseline the layer check did not time
    cell = _row(rows, "ep2_deepseekv3_full_race_layer", "deepep_default")["layer sequential ms (x ref)"]
    assert cell.startswith("- [") and "not among the layer check candidates" in notes[cell[2:]]
    # V2: layer_check null (tuned without --layer-check); the copy: skipped, with its reason
    v2 = _row(rows, "v2_no_layer", "pick (tuned)")["layer overlap ms (x ref)"]
    assert v2.startswith("- [") and "without --layer-check" in notes[v2[2:]]
    hyb = _row(rows, "hyb_layer_skipped", "pick (tuned)")
    for sched in layer["schedules"]:
        cell = hyb[f"layer {sched} ms (x ref)"]
        assert cell.startswith("- [")
        assert notes[cell[2:]] == "layer check skipped: the MoE layer check drives deep_ep.Buffer's API"


def test_a_missing_value_is_a_dash_never_a_number(tmp_path):
    def edit(r):
        r["comparison"] = None
        b = r["baselines"]["torchtitan_16sms"]
        for k in ("dispatch_us", "combine_us", "total_us", "speedup"):
            b.pop(k)
        b["skipped"] = "did not fit"
        r["layer_check"] = None
    path = _copy(tmp_path, HYB, "hyb_nocmp", edit)
    text = _render([path])
    rows, notes = _table(text), _notes(text)
    row = _row(rows, "hyb_nocmp", "torchtitan_16sms")
    assert [row[k] for k in ("dispatch us", "combine us", "total us", "final total us (p10-p90)",
                             "pick speed-up (p10-p90)")] == ["-"] * 5
    assert notes[row["candidate"].split(" ", 1)[1]] == "torchtitan_16sms skipped: did not fit"
    pick = _row(rows, "hyb_nocmp", "pick (tuned)")
    assert pick["final total us (p10-p90)"] == "-" and pick["pick speed-up (p10-p90)"] == "-"
    # no layer schedule in any file: one layer column, '-' with the reason
    assert pick["layer ms (x ref)"].startswith("- [")


def test_cli_prints_the_table_for_committed_files():
    r = subprocess.run([sys.executable, "-m", "deepep_tune.report.libraries", V1, V2, HYB, QWEN], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "pick (tuned)" in r.stdout and "HybridEP @ hybrid-ep 94a9f8f" in r.stdout and not r.stderr


@pytest.mark.parametrize("kind", ["not_json", "not_results", "missing", "no_best_ops"])
def test_cli_refuses_a_file_that_is_not_results(tmp_path, capsys, kind):
    bad = tmp_path / "bad.json"
    if kind == "not_json":
        bad.write_text("{ not json")
    elif kind == "not_results":
        shutil.copy(os.path.join(ROOT, "results/h200-nvlink/ep2_deepseekv3_quick/RESULTS_EP2_sglang.json"), bad)
    elif kind == "no_best_ops":
        res = _res(V2)
        res["best"] = {"num_sms": 132}
        bad.write_text(json.dumps(res))
    assert main([os.path.join(ROOT, V1), str(bad)]) != 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and str(bad) in err and err.startswith("error: ")


def test_cli_error_is_one_line_through_python_m(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = subprocess.run([sys.executable, "-m", "deepep_tune.report.libraries", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert str(bad) in r.stderr
