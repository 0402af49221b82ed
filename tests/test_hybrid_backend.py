"""The HybridEP backend: its knob declaration (deepep_tune/deepep/hybrid.py) and the real HybridBackend class run on
CPU over gloo against tests/fake_hybrid, a stand-in of DeepEP hybrid-ep's HybridEPBuffer (2 ranks under torchrun)."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from _helpers import ROOT, SUBPROCESS_TIMEOUT, read_jsonl, subprocess_env

from deepep_tune.deepep.hybrid import (
    DEFAULT_CHUNK,
    DEFAULT_SMS,
    DEFAULT_STAGES,
    HYBRID,
    config_error,
    fits,
    grid,
    smem_bytes,
)
from deepep_tune.deepep.workload import Workload
from deepep_tune.knobs import OPS, load_library
from deepep_tune.tune.layer import round_order

FAKE = os.path.join(ROOT, "tests", "fake_hybrid")
DSV3 = Workload()  # hidden 7168, top-8 of 256


# --- the declaration -----------------------------------------------------------------------------------------
def test_registered_with_per_op_knobs():
    assert load_library("hybridep") is HYBRID
    assert HYBRID.knobs == {"dispatch": ("num_sms", "tokens_per_chunk", "stages"),
                            "combine": ("num_sms", "tokens_per_chunk", "g2s_stages")}
    assert HYBRID.shared == ()  # each op its own SMs: the handle carries both ops' values


def test_grid_is_small_and_capped():
    g = grid(132)
    for op in OPS:
        assert g[op]["num_sms"] == (8, 16, 24, 32, 48, 64)
        assert g[op]["tokens_per_chunk"] == (64, 128)
    assert g["dispatch"]["stages"] == (10, 14) and g["combine"]["g2s_stages"] == (10, 12)
    assert grid(20)["dispatch"]["num_sms"] == (8, 16)
    space, pruned = HYBRID.build(132, lambda op, c: fits(op, c, 2, DSV3, 4e9) is None)
    assert (len(space.dispatch), len(space.combine), pruned) == (24, 24, 0)  # every JIT-compiled config counts
    capped, _ = HYBRID.build(40, lambda op, c: True)
    assert max(HYBRID.sms_of(c) for op in OPS for c in capped.configs(op)) == 32


@pytest.mark.parametrize("op,values,why", [
    ("dispatch", (0, 64, 10), "positive"), ("dispatch", (24, 0, 10), "multiple of 16"),
    ("dispatch", (24, 8, 10), "multiple of 16"), ("dispatch", (24, 72, 10), "multiple of 16"),
    ("dispatch", (24, 64, 1), ">= 2"), ("combine", (24, 64, 1), ">= 2"), ("combine", (24, 64, 11), "even")])
def test_rejects_what_hybridep_rejects(op, values, why):
    assert why in config_error(op, HYBRID.config(op, *values))


@pytest.mark.parametrize("op,values", [("dispatch", (24, 64, 10)), ("dispatch", (1, 16, 2)),
                                       ("dispatch", (64, 128, 7)), ("combine", (24, 64, 10)), ("combine", (8, 48, 2))])
def test_accepts_what_hybridep_accepts(op, values):
    assert config_error(op, HYBRID.config(op, *values)) is None


def test_shared_memory_model_is_config_cuh():
    # By hand from config.cuh compute_smem_sizes at DeepSeek-V3, EP2, chunk 64, with probs:
    # dispatch 10 stages: 10*7168*2 + 2*64*2*4 + 10*256*4 + 10*16 + 16 + 8 = 154808 -> 154880 (128-aligned)
    assert smem_bytes("dispatch", HYBRID.config("dispatch", 24, 64, 10), 2, 7168, 256) == 154880
    # combine g2s 10, s2g 2: 10*14336 + 2*14336 + 10*1024 + 2*1024 + 10*16 + 10 = 184490 -> 184576
    assert smem_bytes("combine", HYBRID.config("combine", 24, 64, 10), 2, 7168, 256) == 184576


def test_configs_hybridep_would_shrink_are_left_out():
    big = Workload(hidden=8192)
    assert fits("dispatch", HYBRID.config("dispatch", 24, 64, 14), 2, big, 4e9) is not None
    assert fits("combine", HYBRID.config("combine", 24, 64, 12), 2, big, 4e9) is not None
    assert fits("dispatch", HYBRID.config("dispatch", 24, 128, 14), 2, DSV3, 4e9) is None


def test_baselines_and_probe():
    b = {x.name: x for x in HYBRID.baselines(2, 40, {})}
    assert set(b) == {"hybridep_default", "torchtitan_16sms"}
    assert b["hybridep_default"].dispatch.values == (DEFAULT_SMS, DEFAULT_CHUNK, DEFAULT_STAGES) == (24, 64, 10)
    assert b["hybridep_default"].combine.values == (24, 64, 10)
    assert b["torchtitan_16sms"].dispatch.values == b["torchtitan_16sms"].combine.values == (16, 64, 10)
    # the installed library's own default, as the backend read it, wins over the documented one
    assert HYBRID.baselines(2, 40, {"default_sms": 20})[0].dispatch.num_sms == 20
    space, _ = HYBRID.build(132, lambda op, c: True)
    assert HYBRID.probe_config("combine", space.grid("combine", 48)).values == (48, 64, 10)


def test_refuses_what_it_cannot_time():
    from deepep_tune.tune.backends.hybrid import workload_refusal

    def o(colocate=False, **w):
        return SimpleNamespace(shape=Workload(**w), measurement=SimpleNamespace(colocate=colocate))

    assert workload_refusal(o()) is None
    assert "bf16" in workload_refusal(o(dispatch_dtype="fp8"))
    assert "expert-alignment" in workload_refusal(o(expert_alignment=128))
    assert "% 4" in workload_refusal(o(num_experts=18))
    assert "colocate" in workload_refusal(o(colocate=True))


# --- the backend on CPU, 2 ranks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(FAKE, "worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def launches(rec):
    return {tuple(x) for x in rec["launches"]}


def test_runs_the_stand_in_on_the_grid_of_a_small_gpu(reports):
    for r in reports:
        assert r["fake"] is True
        assert r["space"] == {"dispatch": 16, "combine": 16, "sms": [8, 16, 24, 32]}
        assert r["facts"] == {"default_sms": 24, "device_sms": 32}


def test_each_ops_settings_reach_the_kernels_it_times(reports):
    for r in reports:
        # (op, blocks, chunk, stages, with probs): forward dispatch carries probs, the backward's cached one not
        assert launches(r["dispatch"]) == {("dispatch", 16, 128, 14, True), ("dispatch", 16, 128, 14, False)}
        # the combine's handle comes from a dispatch at HybridEP's defaults; its combines run the candidate
        assert launches(r["combine"]) == {("dispatch", 24, 64, 10, True), ("combine", 8, 64, 12, False),
                                          ("combine", 8, 64, 12, True)}
        assert r["dispatch"]["error"] is None and r["combine"]["error"] is None
        assert r["reallocations"] >= 1  # chunk 128 re-allocated the buffer: a collective both ranks joined


def test_parts_follow_the_objective(reports):
    for r in reports:
        assert r["dispatch"]["parts"] == {"dispatch": 3, "cached_dispatch": 3}
        assert r["combine"]["parts"] == {"combine": 3, "combine_bwd": 3}
        assert r["forward_dispatch"]["parts"] == {"dispatch": 3}
        assert r["forward_combine"]["parts"] == {"combine": 3}
        assert launches(r["forward_combine"]) == {("dispatch", 24, 64, 10, True), ("combine", 24, 64, 10, False)}


def test_a_wrong_dispatch_row_is_reported(reports):
    for r in reports:
        assert r["corrupt_value"]["error"].startswith("received row 3 ")
        # swapped rows with equal values: only the (rank, token) stamp sees it
        assert "token" in r["swapped_rows"]["error"] and "expected (rank" in r["swapped_rows"]["error"]
        # the forward dispatch's probs: this rank's experts' columns must be the routing weights
        assert r["wrong_probs"]["error"].startswith("dispatch's probs of received row 2 ")


def test_more_sms_than_the_device_never_runs(reports):
    for r in reports:
        assert r["too_many_sms"]["raised"].startswith("ValueError: num_sms=64 exceeds")
        assert r["too_many_sms"]["launches"] == []


def test_a_config_hybridep_changed_is_not_timed_as_asked(reports):
    for r in reports:
        assert "num_of_stages_dispatch_api" in r["stages_lowered"]["raised"]
        assert "requested 14" in r["stages_lowered"]["raised"]


def test_jit_compiles_are_timed_apart(reports):
    for r in reports:
        first = r["describe"]["hybridep_first_call_s"]
        assert first["combine (32, 128, 12)"] >= 0.55  # two new combine kernels (with and without probs), 0.3 s each
        assert r["jit"]["max_us"] < 0.3e6 and r["jit_again"]["max_us"] < 0.3e6  # none of it in the samples
        assert first["dispatch (16, 128, 14)"] < 0.3


def test_new_configs_are_warm_before_timed_calls(reports):
    """The stand-in's first 2 launches of a just-compiled kernel take 0.25 s each. Of a new dispatch config's three
    slow launches left after its first calls (one of the dispatch with probs, two of the cached dispatch) none is
    timed: they run in the post-compile warm-up, which is reported apart; a second measurement warms nothing."""
    for r in reports:
        assert r["cold"]["error"] is None and r["cold"]["max_us"] < 0.25e6
        warm = r["describe"]["hybridep_post_compile_warmup_s"]
        assert warm["dispatch (32, 64, 14)"] >= 3 * 0.25
        assert set(warm) == set(r["describe"]["hybridep_first_call_s"])  # once per new config, no more
        # the total is the sum of the configs' warm-ups (on the H200 pair each took ~3 ms, and a running total
        # rounded to 10 ms at each step stayed at 0)
        assert r["describe"]["hybridep_first_call_total"]["post_compile_warmup_s"] == round(sum(warm.values()), 3)
        assert r["cold_again"]["max_us"] < 0.25e6


def test_describe_and_environment(reports):
    for r in reports:
        d = r["describe"]
        assert d["deep_ep"].startswith("hybrid-ep 94a9f8f")
        assert d["hybridep_default_sms"] == 24 and d["hybridep_ranks_per_nvlink_domain"] == 2
        assert r["env_before_close"] == {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": "64", "NUM_OF_STAGES_DISPATCH_API": "10",
                                         "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": "128",
                                         "NUM_OF_STAGES_G2S_COMBINE_API": "12"}
        assert r["env_after_close"] == {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": "32", "NUM_OF_STAGES_DISPATCH_API": None,
                                        "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": None,
                                        "NUM_OF_STAGES_G2S_COMBINE_API": None}


# --- the MoE layer check on HybridEP (tests/fake_hybrid/layer_worker.py) ---------------------------------------
@pytest.fixture(scope="module")
def layer_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid_layer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(FAKE, "layer_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


# (dispatch (num_sms, chunk, stages), combine (num_sms, chunk, g2s stages)), as layer_worker.py
LAYER_CANDS = {"pick": ((16, 128, 14), (8, 64, 12)), "titan": ((16, 64, 10), (16, 64, 10))}
LAYER_JIT_S = 0.3  # layer_worker.py: a compile, and each of the 2 slow launches after it


def hybrid_step_launches(d, c, sched):
    """One layer step's kernels: the forward dispatch (with probs) and combine, then backward the combine's
    gradient (a cached dispatch, no probs) and the dispatch's (a combine that reduces probs): all at the
    candidate's settings, which the handle carries."""
    fwd = [["dispatch", *d, True], ["combine", *c, False]]
    return fwd if sched == "forward_only" else fwd + [["dispatch", *d, False], ["combine", *c, True]]


def test_layer_check_runs_on_hybridep(layer_reports):
    res = layer_reports[0]["result"]
    assert layer_reports[1]["result"] == res
    assert res["library"] == "hybridep"
    # no async combine in HybridEP: the overlap schedule is not faked, and the result says why
    assert set(res["schedules"]) == {"sequential", "forward_only"}
    assert "returns no event" in res["schedules_not_run"]["overlap"]
    assert res["num_sms"] == {"pick": 16, "titan": 16}
    assert "num_sms=64 exceeds the device's 32 SMs" in res["skipped_candidates"]["too_many"]
    assert res["reference_check"]["wrong"] == [] and "note" not in res
    assert max(max(e.values()) for e in res["reference_check"]["errors"].values()) < 1e-3


def test_layer_candidates_settings_reach_hybridep_kernels(layer_reports):
    units = [(sched, name) for sched in ("sequential", "forward_only") for name in LAYER_CANDS]
    steps = [("sequential", n) for n in LAYER_CANDS] + units * 2 + [u for r in range(2) for u in round_order(units, r)]
    want = [k for sched, name in steps for k in hybrid_step_launches(*LAYER_CANDS[name], sched)]
    for r in layer_reports:
        assert r["launches"] == want


def test_layer_rounds_wait_until_new_configs_are_warm(layer_reports):
    """Compiles and the slow launches after them happen before the timed rounds (the worker asked for no
    warm-up): every timed step is faster than one slow launch."""
    res = layer_reports[0]["result"]
    assert all(res["first_call_s"][n] >= LAYER_JIT_S for n in LAYER_CANDS)
    assert res["warmup"] == 2
    assert max(t for table in res["schedules"].values() for row in table.values() for t in row["rounds"]) \
        < 1e3 * LAYER_JIT_S


def test_layer_chunk_reallocations_stay_out_of_the_timed_step(layer_reports):
    """The candidates' dispatch chunks differ (128, 64): the buffer re-allocates between them, always in the
    untimed activate(), never inside a step's dispatch."""
    for r in layer_reports:
        changed = [inside for was_changed, inside in r["reallocations"] if was_changed]
        assert len(changed) >= 4 and not any(changed)


def test_layer_check_catches_wrong_hybridep_rows(layer_reports):
    for r in layer_reports:
        res = r["wrong_dispatch"]
        assert res["output_spread"] == 0.0  # one candidate: only the reference check can see it
        assert res["reference_check"]["wrong"] == ["pick"] and "against the reference" in res["note"]
        assert res["reference_check"]["errors"]["pick"]["out"] > 0.1


def test_layer_check_says_when_hybridep_ran_other_settings(layer_reports):
    """HybridEP lowers stages that do not fit shared memory: the candidate's handle then carries other settings,
    and the layer check reports its timings as those of another config."""
    for r in layer_reports:
        res = r["stages_lowered"]
        why = res["knobs_not_in_effect"]["lowered"]
        assert "num_of_stages_dispatch_api" in why and "requested 14" in why
        assert "did not run the settings asked for" in res["note"]


# --- the whole tuner on CPU ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deepep_tune.tune.rank", "--mode", "quick", "--backend", "hybridep", "--num-tokens", "48",
           "--hidden", "64", "--num-topk", "4", "--num-experts", "8", "--iters", "4", "--warmup", "1",
           "--retime-rounds", "2", "--out-dir", str(tmp_path)]
    env = subprocess_env(DEEPEP_TUNE_HYBRID_DEVICE="cpu",
                         PYTHONPATH=os.pathsep.join([ROOT, FAKE, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(glob.glob(str(tmp_path / "RESULTS_EP2_*.json"))[0]))
    assert res["backend"] == "hybridep" and res["library"] == "hybridep"
    assert set(res["best"]) >= {"dispatch", "combine"}
    assert set(res["baselines"]) == {"hybridep_default", "torchtitan_16sms"}
    assert all(b["dispatch_us"] and b["combine_us"] for b in res["baselines"].values())
    assert res["baselines"]["torchtitan_16sms"]["dispatch"] == {"num_sms": 16, "tokens_per_chunk": 64, "stages": 10}
    assert res["hardware"]["hybridep_first_call_s"]
    log = read_jsonl(glob.glob(str(tmp_path / "logs" / "*.jsonl"))[0])
    measured = [x for x in log if "op" in x]
    assert measured and all(x["status"] == "ok" for x in measured)
