"""DeepEP V2 (deep_ep.ElasticBuffer): its knob declaration (deepep_tune/deepep/elastic.py), and the real tuner
backend (deepep_tune/tune/backends/elastic.py) driven on CPU through tests/fake_v2, a gloo stand-in of V2's
deep_ep that moves real tokens, scrambles the receive order like kernel channels, and can return wrong rows."""

import json
import os
import subprocess
import sys

import pytest
from _helpers import ROOT, SUBPROCESS_TIMEOUT, read_jsonl, subprocess_env

from deepep_tune.deepep.elastic import DOCUMENTED_MODEL_SMS, FALLBACK_SMS, V2
from deepep_tune.knobs import load_library
from deepep_tune.tune.backends.elastic import theoretical_sms
from deepep_tune.tune.layer import round_order

FAKE = os.path.join(ROOT, "tests", "fake_v2")
JIT_S = 0.05  # the stand-in's "compile" time for each new (kind, num_sms)


# --- the declaration -----------------------------------------------------------------------------------------
def _sms(cap):
    g = V2.grid(cap)
    assert g["dispatch"] == g["combine"]
    return g["dispatch"]["num_sms"]


def test_declaration_is_the_registered_library():
    assert load_library("deepep-v2") is V2
    assert V2.knobs == {"dispatch": ("num_sms",), "combine": ("num_sms",)}
    assert V2.shared == () and not V2.sms_shared  # each op its own SM count: V2 takes num_sms per call


def test_grid_is_small_capped_and_includes_the_cap():
    assert _sms(132) == (8, 16, 24, 32, 48, 64, 96, 128, 132)
    assert _sms(64) == (8, 16, 24, 32, 48, 64)
    assert _sms(20) == (8, 16, 20)
    space, pruned = V2.build(132, lambda op, c: True)
    assert len(space.dispatch) == len(space.combine) == 9 and pruned == 0


@pytest.mark.parametrize("n, ok", [(0, False), (-2, False), (1, True), (7, True), (22, True), (132, True)])
def test_validity_is_v2s_positive_num_sms(n, ok):
    # V2 asserts num_sms > 0; odd counts run (cluster dim 1); <= device SMs is the backend's SM cap
    for op in ("dispatch", "combine"):
        assert (V2.error(op, V2.config(op, n)) is None) == ok


def test_baselines_use_the_nodes_model_values():
    bases = {b.name: b for b in V2.baselines(2, 32, {"theoretical_num_sms": {"True": 18, "False": 70}})}
    assert set(bases) == {"v2_model_overlap", "v2_model_no_overlap", "v2_20sms"}
    assert (bases["v2_model_overlap"].dispatch.num_sms, bases["v2_model_overlap"].combine.num_sms) == (18, 18)
    assert (bases["v2_model_no_overlap"].dispatch.num_sms, bases["v2_model_no_overlap"].combine.num_sms) == (70, 70)
    assert bases["v2_20sms"].dispatch.num_sms == bases["v2_20sms"].combine.num_sms == FALLBACK_SMS
    assert "on this node" in bases["v2_model_overlap"].description


def test_baselines_without_facts_fall_back_and_say_so():
    bases = {b.name: b for b in V2.baselines(2, 32, {})}
    assert bases["v2_model_overlap"].dispatch.num_sms == DOCUMENTED_MODEL_SMS[True] == 22
    assert bases["v2_model_no_overlap"].combine.num_sms == DOCUMENTED_MODEL_SMS[False] == 64
    assert "not computed here" in bases["v2_model_no_overlap"].description


class _ModelStub:
    """get_theoretical_num_sms that answers from the buffer's attribute at call time, as V2's does."""

    def __init__(self):
        self.prefer_overlap_with_compute = True
        self.calls = []

    def get_theoretical_num_sms(self, num_experts, num_topk, **kw):
        self.calls.append((num_experts, num_topk, kw, self.prefer_overlap_with_compute))
        return 22 if self.prefer_overlap_with_compute else 64


def test_theoretical_sms_flips_the_attribute_and_restores_it():
    buf = _ModelStub()
    assert theoretical_sms(buf, 256, 8, 430.3) == {"True": 22, "False": 64}
    assert buf.calls == [(256, 8, {}, True), (256, 8, {"nvlink_gbs": 430.3}, False)]  # other args: no cache hit
    assert buf.prefer_overlap_with_compute is True


def test_stand_in_model_matches_the_h200_measurement():
    """The stand-in's get_theoretical_num_sms is V2's arithmetic: with 2x H200's NVLink it gives the 22/64 that
    probe.py measured for 256 experts, top-8, EP2 (API_NOTES §1)."""
    # another test may have imported the v1 stand-in as deep_ep: load V2's beside it, then put everything back
    saved = {k: v for k, v in sys.modules.items() if k == "deep_ep" or k.startswith("deep_ep.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, FAKE)
    try:
        from deep_ep.buffers import ElasticBuffer
    finally:
        sys.path.remove(FAKE)
        for k in [k for k in sys.modules if k == "deep_ep" or k.startswith("deep_ep.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    buf = object.__new__(ElasticBuffer)
    buf.num_ranks = buf.num_nvlink_ranks = 2
    buf.prefer_overlap_with_compute = True
    assert theoretical_sms(buf, 256, 8, 18 * 26.562 * 0.9) == {"True": 22, "False": 64}


# --- the backend on the stand-in, 2 ranks under torchrun -------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(FAKE, "elastic_worker.py"), str(out)]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([FAKE, ROOT]), FAKE_V2_JIT_S=str(JIT_S))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def test_model_facts_and_setup_warmup(ranks):
    for r in ranks:
        assert r["facts"] == {"theoretical_num_sms": {"True": 22, "False": 64}}
        # set-up ran V2's own choice once (outside any measurement's watchdog): its compiles are on record
        assert set(r["setup_jit"]) == {"dispatch@22", "combine@22"}
        assert min(r["setup_jit"].values()) >= JIT_S


def test_good_measurements_pass_the_checks(ranks):
    """The stand-in returns rows channel by channel, not by (source rank, token): passing means the checks
    identified every row through handle.recv_src_metadata."""
    for r in ranks:
        for key in ("dispatch16", "combine24", "fine_after", "fp8_dispatch", "fp8_combine"):
            assert r[key]["status"] == "ok" and r[key]["error"] is None, (key, r[key])
        assert r["dispatch16"]["parts"] == ["cached_dispatch", "dispatch"] and r["dispatch16"]["n"] == [2, 2]
        assert r["combine24"]["parts"] == ["combine", "combine_bwd"]
        assert r["forward"]["parts"] == ["dispatch"]


def test_each_ops_num_sms_reaches_v2s_calls(ranks):
    for r in ranks:
        # dispatch at 16: first calls (compile) of both kernels, then 1 warm-up + 2 timed iterations
        assert r["dispatch16_calls"] == [["dispatch", 16], ["cached_dispatch", 16]] * 4
        # combine at 24: the handle's dispatch at 24 once, then every combine at 24
        assert r["combine24_calls"] == [["dispatch", 24]] + [["combine", 24]] * 7
        # nothing is compiled twice: a second measurement makes only its own iteration's calls
        assert r["dispatch16_again_calls"] == [["dispatch", 16], ["cached_dispatch", 16]]


def test_first_calls_are_timed_per_kernel_and_num_sms(ranks):
    for r in ranks:
        jit = r["jit_after"]
        for key in ("dispatch@16", "cached_dispatch@16", "dispatch@24", "combine@24"):
            assert jit[key] >= JIT_S, key
        assert "cached_dispatch@24" not in jit and "combine@16" not in jit
        desc = r["describe"]["jit_compile_s"]
        assert desc["total"] == pytest.approx(sum(v for k, v in desc.items() if k != "total"), abs=0.02)


def test_wrong_rows_are_reported(ranks):
    r0, r1 = ranks
    assert r0["wrong_dispatch"]["error"].startswith("received row 0 should be token")
    assert r0["duplicate"]["error"] == "handle.recv_src_metadata names other tokens than the routing sends to this rank"
    assert r0["wrong_cached"]["error"].startswith("cached dispatch: received row")
    assert r0["wrong_combine"]["error"].startswith("combine: combined row 0")
    assert r0["fp8_wrong"]["error"].startswith("received row 0")
    for key in ("wrong_dispatch", "duplicate", "wrong_cached", "wrong_combine"):
        assert r0[key]["status"] == "ok" and r1[key]["error"] is None  # measured; only rank 0 was wrong
    # through the Measurer, every rank records the config as wrong, with rank 0's reason
    for r in ranks:
        rec = r["measurer_record"]
        assert rec["status"] == "wrong" and rec["error"].startswith("rank 0: received row") and rec["num_sms"] == 8


def test_a_wrong_handle_fails_every_rank_alike(ranks):
    r0, r1 = ranks
    assert r0["wrong_handle"]["status"] == r1["wrong_handle"]["status"] == "raised"
    assert "wrong here: received row" in r0["wrong_handle"]["error"]
    assert r1["wrong_handle"]["error"].endswith("wrong on another rank")


def test_v2s_host_check_raises(ranks):
    for r in ranks:
        assert r["too_many_sms"]["status"] == "raised" and "num_sms <=" in r["too_many_sms"]["error"]


# --- the MoE layer check on V2 (tests/fake_v2/layer_worker.py) -------------------------------------------------
LAYER_JIT_S = 0.3  # long enough that a compile inside a timed round would show in its wall-clock time


@pytest.fixture(scope="module")
def layer_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic_layer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(FAKE, "layer_worker.py"), str(out)]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([FAKE, ROOT]), FAKE_V2_JIT_S=str(LAYER_JIT_S))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


LAYER_CANDS = {"pick": (16, 24), "other": (32, 32)}  # (dispatch num_sms, combine num_sms), as layer_worker.py
LAYER_SCHEDULES = ("sequential", "overlap", "forward_only")


def v2_step_calls(d, c, sched):
    """One layer step on V2: forward dispatch and combine, then backward the combine's gradient (cached dispatch)
    and the dispatch's gradient (combine), each with its op's num_sms."""
    fwd = [["dispatch", d], ["combine", c]]
    return fwd if sched == "forward_only" else fwd + [["cached_dispatch", d], ["combine", c]]


def test_layer_check_runs_on_v2(layer_ranks):
    res = layer_ranks[0]["result"]
    assert layer_ranks[1]["result"] == res  # every rank reports the same reduced numbers
    assert res["library"] == "deepep-v2" and set(res["calls"]) == {"dispatch", "combine", "combine_backward",
                                                                   "dispatch_backward"}
    assert set(res["schedules"]) == set(LAYER_SCHEDULES) and "schedules_not_run" not in res  # V2 overlaps
    for table in res["schedules"].values():
        assert set(table) == {"pick", "other"} and all(len(row["rounds"]) == 2 for row in table.values())
    assert res["num_sms"] == {"pick": 24, "other": 32}  # the larger of the ops' counts: SMs taken from the GEMMs
    assert "num_sms=134 exceeds 64 SMs" in res["skipped_candidates"]["too_many"]
    ref = res["reference_check"]
    assert ref["wrong"] == [] and "note" not in res and res["output_spread"] < 1e-2
    assert set(ref["errors"]["pick"]) >= {"out", "grad_x", "grad_topk_weights", "grad_w1", "grad_w3", "grad_w2"}
    assert max(max(e.values()) for e in ref["errors"].values()) < 1e-3


def test_layer_candidates_sms_reach_v2s_calls(layer_ranks):
    """Every V2 call of the layer check, in order: each candidate's first step (before any round), the warm-up
    rounds, then the rotated timed rounds; the reference pass makes no V2 call."""
    units = [(sched, name) for sched in LAYER_SCHEDULES for name in LAYER_CANDS]
    steps = [("sequential", n) for n in LAYER_CANDS] + units * 2 + [u for r in range(2) for u in round_order(units, r)]
    want = [call for sched, name in steps for call in v2_step_calls(*LAYER_CANDS[name], sched)]
    for r in layer_ranks:
        assert r["calls"] == want


def test_layer_compiles_stay_out_of_v2s_rounds(layer_ranks):
    res = layer_ranks[0]["result"]
    for name in LAYER_CANDS:  # three new kernels each: dispatch, cached dispatch and combine at new SM counts
        assert res["first_call_s"][name] >= 3 * LAYER_JIT_S
    assert res["warmup"] == 2  # the worker asked for 1: a JIT library gets at least two
    assert max(t for table in res["schedules"].values() for row in table.values() for t in row["rounds"]) \
        < 1e3 * LAYER_JIT_S


def test_layer_check_catches_a_wrong_v2_output(layer_ranks):
    """One candidate, wrong on rank 0 in every call: no other candidate disagrees (output_spread 0), only the
    reference check sees it."""
    for r in layer_ranks:
        for key, wrong in (("wrong_combine", ("out", "grad_x")), ("wrong_dispatch", ("out", "grad_topk_weights"))):
            res = r[key]
            assert res["output_spread"] == 0.0
            assert res["reference_check"]["wrong"] == ["pick"] and "against the reference" in res["note"]
            assert all(res["reference_check"]["errors"]["pick"][k] > 0.1 for k in wrong)


def test_v2_schedules_place_the_combine_wait(layer_ranks):
    """The forward combine is asynchronous (the stand-in asserts a wait on a synchronous call): sequential waits
    before the shared experts, overlap runs them first."""
    for r in layer_ranks:
        assert r["schedule_order"] == {"sequential": ["wait_combine", "shared"], "overlap": ["shared", "wait_combine"]}


# --- the tuner end to end: what the launcher starts on every rank ----------------------------------------------
@pytest.mark.slow
def test_tuner_end_to_end_on_the_stand_in(tmp_path):
    """`python -m deepep_tune 2 quick --backend deepep-v2` needs GPUs (the launcher checks nvidia-smi), so this
    runs the command it starts on each rank: torchrun ... -m deepep_tune.tune.rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "deepep_tune.tune.rank", "--mode", "quick", "--backend", "deepep-v2", "--num-tokens", "48", "--hidden",
           "256", "--num-topk", "4", "--num-experts", "8", "--warmup", "1", "--iters", "4", "--race-iters", "2",
           "--retime-rounds", "2", "--out-dir", str(tmp_path)]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([FAKE, ROOT]), FAKE_V2_DEVICE_SMS="48")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(tmp_path / "RESULTS_EP2_deepep-v2.json"))
    assert res["library"] == "deepep-v2" and res["backend"] == "deepep-v2"
    assert res["space"]["sms_values"] == [8, 16, 24, 32, 48]
    assert res["hardware"]["theoretical_num_sms"] == {"True": 22, "False": 48}  # no-overlap 64, capped at 48 SMs
    assert {"dispatch@8", "combine@48", "total"} <= set(res["hardware"]["jit_compile_s"])
    bases = res["baselines"]
    assert set(bases) == {"v2_model_overlap", "v2_model_no_overlap", "v2_20sms"}
    assert bases["v2_model_overlap"]["dispatch"] == bases["v2_model_overlap"]["combine"] == {"num_sms": 22}
    assert all(b["total_us"] for b in bases.values())  # measured, like any config
    log = read_jsonl(next((tmp_path / "logs").glob("*.jsonl")))
    meas = [x for x in log if "op" in x]
    assert meas and all(x["status"] == "ok" for x in meas)
    assert {x["num_sms"] for x in meas if x["op"] == "combine"} >= {8, 16, 24, 32, 48, 22, 20}


def test_backend_errors_say_what_is_missing(tmp_path, monkeypatch):
    """--backend deepep-v2 without V2, or with a V2 that refuses torch's NCCL: one line saying what to do."""
    import types

    from deepep_tune.tune.backends.elastic import import_v2
    from deepep_tune.tune.setup import UsageError

    monkeypatch.setitem(sys.modules, "deep_ep", types.ModuleType("deep_ep"))  # a v1 install: no ElasticBuffer
    with pytest.raises(UsageError, match="has no ElasticBuffer: --backend deepep-v2 needs DeepEP main"):
        import_v2()
    for k in [k for k in sys.modules if k == "deep_ep" or k.startswith("deep_ep.")]:
        monkeypatch.delitem(sys.modules, k)
    pkg = tmp_path / "deep_ep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise AssertionError('NCCL 2.28.9 is loaded, deep_ep was built with 2.30.7')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"DeepEP V2 does not load \(NCCL 2.28.9 is loaded.*NCCL >= 2.30.4") as e:
        import_v2()
    assert "\n" not in str(e.value)
