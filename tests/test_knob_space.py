"""A library is a backend plus a declaration of its knobs: a second declaration, shaped like DeepEP V2
(tests/data/v2_shaped.py: one num_sms per op, a shared boolean, no chunk or buffer), runs through quick, full,
resume and the results file on the replay backend, and the per-num_sms table is an SM budget per op."""

import json
import os

import pytest
from _helpers import ROOT, SUBPROCESS_TIMEOUT, read_jsonl, run_launch

from deepep_tune.knobs import Knobs, load_library
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import Measurer, MeasureSettings
from deepep_tune.tune.search import full_search, per_sms_table, pick, quick_search
from tests.data.v2_shaped import KNOBS, SMS, V2_SHAPED, time_us

LIB = "tests.data.v2_shaped:V2_SHAPED"


def _landscape(path, parts=True):
    truth = {}
    with open(path, "w") as f:
        for op in ("dispatch", "combine"):
            for s in SMS:
                for ov in (False, True):
                    t = time_us(op, s, ov)
                    truth[(op, s, ov)] = t
                    rec = {"op": op, "num_sms": s, "overlap": ov, "time_us": t}
                    if parts:
                        bwd = "cached_dispatch" if op == "dispatch" else "combine_bwd"
                        rec["parts_us"] = {op: t / 2, bwd: t / 2}
                    f.write(json.dumps(rec) + "\n")
    return truth


def _optimum(truth, budget=None):
    """Independently: per overlap setting, the best dispatch and the best combine within the budget, each op on
    its own SM count; the smallest total wins."""
    best = None
    for ov in (False, True):
        tot = 0.0
        pair = []
        for op in ("dispatch", "combine"):
            t, s = min((t, s) for (o, s, v), t in truth.items() if o == op and v == ov and (budget is None or s <= budget))
            tot += t
            pair.append(s)
        if best is None or tot < best[0]:
            best = (tot, ov, *pair)
    return best


def test_load_library_by_module_path():
    assert load_library(LIB) is V2_SHAPED
    with pytest.raises(ValueError, match="unknown library"):
        load_library("no-such-library")


@pytest.mark.parametrize("search", [full_search, quick_search])
def test_search_finds_the_optimum_with_per_op_sms(tmp_path, search):
    truth = _landscape(tmp_path / "v2.jsonl")
    backend = ReplayBackend(str(tmp_path / "v2.jsonl"), V2_SHAPED)
    meas = Measurer(backend, MeasureSettings(0, 1), rank=0, log=None)
    space = backend.space()
    search(meas, space)
    rows = per_sms_table(meas.observed(), space)
    best = pick(rows)
    tot, ov, ds, cs = _optimum(truth)
    assert (best.dispatch, best.combine) == (Knobs.of(KNOBS, (ds, ov)), Knobs.of(KNOBS, (cs, ov)))
    assert best.num_sms == max(ds, cs) == 24 and ds == 16  # combine may differ from dispatch
    assert best.total_us == pytest.approx(tot)
    # each row is an SM budget: both ops within it, one of them using all of it
    for r in rows:
        assert max(r.dispatch.num_sms, r.combine.num_sms) == r.num_sms
        assert r.dispatch.overlap == r.combine.overlap == dict(r.group)["overlap"]


def test_full_table_rows_are_the_best_within_each_budget(tmp_path):
    truth = _landscape(tmp_path / "v2.jsonl")
    backend = ReplayBackend(str(tmp_path / "v2.jsonl"), V2_SHAPED)
    meas = Measurer(backend, MeasureSettings(0, 1), rank=0, log=None)
    full_search(meas, backend.space())
    rows = per_sms_table(meas.observed(), backend.space())
    for budget in (8, 12, 20):
        within = pick([r for r in rows if r.num_sms <= budget])
        assert within.total_us == pytest.approx(_optimum(truth, budget)[0])


def _run(tmp_path, mode, *extra, out="out"):
    land = tmp_path / "v2.jsonl"
    if not land.exists():
        _landscape(land)
    return run_launch(["2", mode, "--backend", "replay", "--replay", str(land), "--library", LIB,
                       "--out-dir", str(tmp_path / out), "--retime-rounds", "2", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_tuner_runs_a_second_library_end_to_end(tmp_path, mode):
    p = _run(tmp_path, mode, "--run-id", "r1")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(tmp_path / "out" / "RESULTS_EP2_replay.json"))
    assert res["library"] == LIB
    assert res["best"]["dispatch"] == {"num_sms": 16, "overlap": False, **{k: v for k, v in res["best"]["dispatch"].items()
                                                                         if k not in ("num_sms", "overlap")}}
    assert (res["best"]["combine"]["num_sms"], res["best"]["combine"]["overlap"]) == (24, False)
    assert res["space"]["knobs"]["dispatch"] == list(KNOBS) and res["space"]["shared"] == ["overlap"]
    assert {r["num_sms"] for r in res["per_num_sms"]} <= set(SMS)
    assert set(res["baselines"]) == {"model_overlap_True", "model_overlap_False"}
    assert res["baselines"]["model_overlap_False"]["dispatch"] == {"num_sms": 24, "overlap": False}
    assert res["comparison"]["candidates"]["pick"]["rounds"] == 2
    assert "normal_dispatch" not in res  # no DeepEP v1 paste targets for another library
    log = read_jsonl(tmp_path / "out" / "logs" / "tune_ep2_r1.jsonl")
    assert log[0]["library"] == LIB
    assert all(set(KNOBS) <= set(r) and "nvl_chunk" not in r for r in log if "op" in r)


@pytest.mark.slow
def test_a_second_library_resumes_from_its_log(tmp_path):
    p = _run(tmp_path, "full", "--run-id", "first")
    assert p.returncode == 0, p.stderr[-3000:]
    log = tmp_path / "out" / "logs" / "tune_ep2_first.jsonl"
    lines = log.read_text().splitlines()
    measured = [ln for ln in lines if '"op"' in ln]
    # cut the log after half of its measurements and resume it: nothing measured twice, same answer
    keep = lines.index(measured[len(measured) // 2]) + 1
    cut = tmp_path / "cut" / "logs" / "tune_ep2_cut.jsonl"
    cut.parent.mkdir(parents=True)
    cut.write_text("\n".join(lines[:keep]) + "\n")
    p = _run(tmp_path, "full", "--resume", str(cut), out="cut")
    assert p.returncode == 0, p.stderr[-3000:]
    a = json.load(open(tmp_path / "out" / "RESULTS_EP2_replay.json"))
    b = json.load(open(tmp_path / "cut" / "RESULTS_EP2_replay.json"))
    assert (a["best"]["dispatch"], a["best"]["combine"]) == (b["best"]["dispatch"], b["best"]["combine"])
    assert b["resumed"] is True and b["num_measured_this_launch"] < b["num_measurements"]
    # a v1 log cannot be resumed as this library
    p = run_launch(["2", "full", "--backend", "replay", "--replay", str(tmp_path / "v2.jsonl"),
                    "--out-dir", str(tmp_path / "cut"), "--resume", str(cut)])
    assert p.returncode == 2 and "library" in p.stderr


def test_the_library_is_named_on_the_command_line_or_in_the_landscape(tmp_path):
    land = tmp_path / "v2.jsonl"
    _landscape(land)
    # without --library the landscape is read as DeepEP v1's and refused with a one-line error
    p = run_launch(["2", "quick", "--backend", "replay", "--replay", str(land), "--out-dir", str(tmp_path / "o")])
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "nvl_chunk" in p.stderr
    p = run_launch(["2", "quick", "--backend", "replay", "--replay", str(land), "--library", "nope",
                    "--out-dir", str(tmp_path / "o")])
    assert p.returncode == 2 and "unknown library" in p.stderr


def test_declaration_lives_outside_the_tuner():
    src = open(os.path.join(ROOT, "tests", "data", "v2_shaped.py")).read()
    assert "deepep_tune.tune" not in src
    assert SUBPROCESS_TIMEOUT > 0


# --- one SM limit for every backend and the baselines; layer sizes checked before any rank starts --------------

@pytest.mark.slow
def test_reference_backend_obeys_max_sms_in_the_baselines(tmp_path):
    """--max-sms 16 on the reference backend: DeepEP as shipped (20 SMs) and (24, 8, 256) are skipped, never
    measured (the reference backend used to keep its own 32-SM cap for the baselines)."""
    p = run_launch(["2", "quick", "--backend", "reference", "--num-tokens", "32", "--hidden", "256", "--num-topk", "2",
                    "--num-experts", "8", "--iters", "1", "--warmup", "0", "--retime-rounds", "1", "--max-sms", "16",
                    "--out-dir", str(tmp_path), "--run-id", "cap"])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(tmp_path / "RESULTS_EP2_reference.json"))
    for name in ("deepep_default_20sms", "community_24_8_256"):
        assert "exceeds this run's limit of 16" in res["baselines"][name]["skipped"]
    log = read_jsonl(tmp_path / "logs" / "tune_ep2_cap.jsonl")
    assert max(r["num_sms"] for r in log if "op" in r) <= 16
    assert res["hardware"]["sms_cap"] == 16


@pytest.mark.parametrize("flags,word", [
    (["--moe-intermediate", "30"], "moe_intermediate 30 must be a positive multiple of 8"),
    (["--moe-intermediate", "64", "--num-shared-experts", "1", "--shared-intermediate", "0"], "expert sizes"),
    (["--moe-intermediate", "64", "--num-shared-experts", "1", "--shared-intermediate", "12"], "shared expert width 12"),
])
def test_bad_layer_sizes_are_refused_before_any_rank_starts(tmp_path, flags, word):
    p = run_launch(["2", "quick", "--backend", "reference", "--layer-check", *flags, "--out-dir", str(tmp_path / "o")])
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --layer-check") and word in lines[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_layer_check_takes_the_preset_sizes_of_the_default_shape():
    from deepep_tune.deepep.workload import LayerShape
    from deepep_tune.tune.options import Options, layer_shape, layer_sizes_source, options_error

    o = Options.of(backend="reference", layer_check=True)  # DeepSeek-V3's shape, no --model
    assert options_error(o, 2) is None
    assert layer_shape(o) == LayerShape(4096, 7168, 8, 256, 2048, 1, 2048)
    assert "DeepSeek-V3" in layer_sizes_source(o)
    # a shape no preset has still needs the sizes
    odd = Options.of(backend="reference", layer_check=True, hidden=1024)
    assert layer_shape(odd) is None and "--moe-intermediate" in options_error(odd, 2)
    assert layer_sizes_source(Options.of(layer_check=True, moe_intermediate=64)) == "flags"


@pytest.mark.slow
def test_layer_check_says_which_sizes_it_used(tmp_path):
    p = run_launch(["2", "quick", "--backend", "reference", "--num-tokens", "32", "--hidden", "256", "--num-topk", "2",
                    "--num-experts", "8", "--iters", "1", "--warmup", "0", "--retime-rounds", "1", "--max-sms", "8",
                    "--layer-check", "--moe-intermediate", "64", "--layer-rounds", "1", "--out-dir", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[layer] expert FFN 64, shared experts 0 x 0 (from flags)" in p.stdout
    layer = json.load(open(tmp_path / "RESULTS_EP2_reference.json"))["layer_check"]
    assert layer["sizes_from"] == "flags" and layer["shape"]["moe_intermediate"] == 64
