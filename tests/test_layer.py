"""The MoE layer check: experts, the DeepEP autograd pairing (over the CPU reference buffer), interleaving and the
cross-rank timing reduction."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _helpers import ROOT, SUBPROCESS_TIMEOUT, subprocess_env

from deepep_tune.deepep.config import TuneConfig
from deepep_tune.deepep.workload import LayerShape
from deepep_tune.deepep.workload import layer_shape_error as shape_error
from deepep_tune.tune.layer import (
    GROUP_ALIGN,
    VERIFY_TOLERANCE,
    MoELayer,
    candidate_error,
    dense_ffn,
    full_weights,
    reduce_rounds,
    round_order,
    row_error,
)

SHAPE = LayerShape(num_tokens=16, hidden=32, num_topk=2, num_experts=8, moe_intermediate=16)


# --- pure parts ----------------------------------------------------------------------------------------------
def test_round_order_rotates():
    units = ["a", "b", "c"]
    assert [round_order(units, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                         ["a", "b", "c"]]
    # over len(units) rounds every unit takes every position once
    for pos in range(3):
        assert sorted(round_order(units, r)[pos] for r in range(3)) == units
    assert round_order([], 5) == []


def test_reduce_rounds_takes_slowest_rank_per_round():
    per_rank = [
        {"seq": {"ref": [10.0, 10.0, 10.0], "c": [5.0, 9.0, 4.0]}},
        {"seq": {"ref": [12.0, 8.0, 20.0], "c": [6.0, 2.0, 10.0]}},
    ]
    out = reduce_rounds(per_rank, "ref")["seq"]
    assert out["ref"]["rounds"] == [12.0, 10.0, 20.0]
    assert out["c"]["rounds"] == [6.0, 9.0, 10.0]
    assert out["ref"]["median_ms"] == 12.0 and out["c"]["median_ms"] == 9.0
    assert out["c"]["p10_ms"] == pytest.approx(6.0 + 0.2 * 3.0)  # linear interpolation between ranks
    assert out["c"]["p90_ms"] == pytest.approx(9.0 + 0.8 * 1.0)
    # speed-up per round = reference / candidate: 2.0, 10/9, 2.0
    assert out["c"]["speedup_vs_reference"] == 2.0
    assert out["c"]["speedup_p10"] == pytest.approx(10 / 9 + 0.2 * (2 - 10 / 9))
    assert out["ref"]["speedup_vs_reference"] == 1.0
    assert "speedup_vs_reference" not in reduce_rounds(per_rank, None)["seq"]["c"]


def test_candidate_and_shape_errors():
    big = 10**12
    assert candidate_error(SHAPE, TuneConfig(8, 4, 64), TuneConfig(8, 2, 64), 2, big) is None
    assert "num_sms" in candidate_error(SHAPE, TuneConfig(8, 4, 64), TuneConfig(10, 2, 64), 2, big)
    assert "nvl_chunk" in candidate_error(SHAPE, TuneConfig(8, 64, 64), TuneConfig(8, 2, 64), 2, big)
    assert "NVL bytes" in candidate_error(SHAPE, TuneConfig(8, 4, 64), TuneConfig(8, 2, 64), 2, 1024)
    assert shape_error(SHAPE, 2) is None
    assert shape_error(SHAPE, 3) is not None
    assert shape_error(LayerShape(16, 30, 2, 8, 16), 2) is not None  # grouped GEMM strides need multiples of 8


# --- routed experts in one process: permutation, padding and the grouped GEMM --------------------------------
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_routed_experts_match_a_loop_over_experts(impl):
    torch.manual_seed(0)
    layer = MoELayer(SHAPE, rank=1, num_ranks=2, device=torch.device("cpu"), dtype=torch.float32, seed=3,
                     experts_impl=impl)
    n, k, local = 11, SHAPE.num_topk, SHAPE.num_experts // 2
    recv_x = torch.randn(n, SHAPE.hidden)
    recv_idx = torch.randint(-1, local, (n, k))
    recv_idx[0] = -1  # a row with no local expert
    recv_w = torch.rand(n, k) * (recv_idx >= 0)
    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=local).tolist()
    padded = [-(-c // GROUP_ALIGN) * GROUP_ALIGN for c in counts]
    got = layer.routed_experts(recv_x, recv_idx, recv_w, padded)
    (w1, w3, w2), _ = full_weights(SHAPE, 3, torch.device("cpu"), torch.float32)
    want = torch.zeros_like(recv_x)
    for t in range(n):
        for j in range(k):
            e = int(recv_idx[t, j])
            if e >= 0:
                want[t] += recv_w[t, j] * dense_ffn(recv_x[t:t + 1], w1[local + e], w3[local + e], w2[local + e])[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[0], torch.zeros(SHAPE.hidden))


def test_local_experts_are_the_global_ones():
    (w1, _, w2), _ = full_weights(SHAPE, 5, torch.device("cpu"), torch.bfloat16)
    for rank in range(2):
        layer = MoELayer(SHAPE, rank, 2, torch.device("cpu"), torch.bfloat16, seed=5)
        assert torch.equal(layer.w1, w1[rank * 4:(rank + 1) * 4]) and torch.equal(layer.w2, w2[rank * 4:(rank + 1) * 4])


def test_row_error_sees_one_wrong_row_among_many():
    """The reference check's metric: bf16 rounding stays far below the tolerance, one wrong row of 4096 does not
    (a relative norm would dilute it to ~1/64)."""
    torch.manual_seed(0)
    want = torch.randn(4096, 64)
    assert row_error(want.to(torch.bfloat16), want) < 1e-2
    got = want.clone()
    got[1234] = want[3210]
    assert row_error(got, want) > 10 * VERIFY_TOLERANCE
    assert row_error(got[:-1], want) == 1e9  # a lost row: shapes differ


class _NoOverlapComm:
    """A library whose combine cannot run beside the compute stream; records any call made."""

    no_overlap = "no event to wait on"

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append(name)


def test_overlap_is_not_faked_for_a_library_that_cannot():
    layer = MoELayer(SHAPE, 0, 2, torch.device("cpu"), torch.bfloat16, seed=1)
    comm = _NoOverlapComm()
    x = torch.zeros(SHAPE.num_tokens, SHAPE.hidden, dtype=torch.bfloat16)
    idx = torch.zeros(SHAPE.num_tokens, SHAPE.num_topk, dtype=torch.int64)
    with pytest.raises(ValueError, match="no overlap schedule: no event to wait on"):
        layer.run(x, idx, torch.ones(SHAPE.num_tokens, SHAPE.num_topk), comm, "overlap")
    assert comm.calls == []  # refused before any collective call


# --- under torchrun: layer vs the plain reference, and layer_check ----------------------------------------------
@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "data", "layer_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


# bf16 layer vs a float32 reference from the same bf16 values: ~0.5 % relative error; a lost copy, a missing
# routing weight or a misrouted gradient is O(10 %) or more.
TOL = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("schedule", ["sequential", "overlap"])
def test_layer_matches_plain_reference(reports, impl, schedule):
    for rep in reports:
        c = rep["correctness"]
        r = c[f"{impl}_{schedule}"]
        for key in ("out", "grad_x", "grad_topk_weights", "grad_w1", "grad_w3", "grad_w2"):
            assert r[key] < TOL, (key, r[key])
        assert r["param_grads_untouched"]  # gradients come back from autograd.grad, never accumulate in .grad
        assert c["max_rel_err"] < TOL and c["weights_match"]
        assert c["schedules_equal"] and c["out_dtype"] == "torch.bfloat16" and c["out_norm"] > 1


@pytest.mark.slow
def test_layer_check_result(reports):
    results = [rep["timing"]["result"] for rep in reports]
    assert results[0] == results[1]  # every rank reports the same reduced numbers
    res = results[0]
    assert res["reference"] == "deepep_as_shipped"
    assert set(res["skipped_candidates"]) == {"mismatched_sms", "too_big"}
    assert res["num_sms"] == {"deepep_as_shipped": 20, "pick": 8, "other": 12}
    assert set(res["schedules"]) == {"sequential", "overlap", "forward_only"}
    assert res["output_spread"] < 1e-2 and "note" not in res
    for table in res["schedules"].values():
        assert set(table) == {"deepep_as_shipped", "pick", "other"}
        for name, row in table.items():
            assert len(row["rounds"]) == 4
            assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
            assert row["speedup_vs_reference"] > 0
        assert table["deepep_as_shipped"]["speedup_vs_reference"] == 1.0


@pytest.mark.slow
def test_layer_check_interleaves_candidates(reports):
    """The forward dispatches run warmup (units in order), then round r = the units rotated by r."""
    ship, pick, other = [20, 24, 256], [8, 4, 64], [12, 6, 128]
    units = [ship, pick, other] * 3  # (schedule, candidate) units: sequential, overlap, forward_only
    checks = [ship, pick, other]  # one untimed forward per candidate: outputs must agree
    want = checks + units + [u for r in range(4) for u in round_order(units, r)]
    for rep in reports:
        assert rep["timing"]["dispatch_log"] == want


@pytest.mark.slow
def test_layer_check_times_the_backward(reports):
    """Every timed forward + backward unit (sequential, overlap) runs the backward: the forward combine's gradient
    is a cached dispatch with the candidate's dispatch config. forward_only runs none, nor do the untimed checks."""
    ship, pick, other = [20, 24, 256], [8, 4, 64], [12, 6, 128]
    units = [(sched, cfg) for sched in ("sequential", "overlap", "forward_only") for cfg in (ship, pick, other)]
    steps = units + [u for r in range(4) for u in round_order(units, r)]  # warmup, then the rotated rounds
    want = [cfg for sched, cfg in steps if sched != "forward_only"]
    assert len(want) == 6 * 5
    for rep in reports:
        assert rep["timing"]["cached_dispatch_log"] == want


@pytest.mark.slow
def test_schedules_place_the_combine_wait(reports):
    """sequential waits for the forward combine before the shared experts; overlap runs them while it combines."""
    for rep in reports:
        order = rep["schedule_order"]
        assert order["sequential"] == ["wait_combine", "shared"]
        assert order["overlap"] == ["shared", "wait_combine"]


@pytest.mark.slow
def test_layer_check_flags_a_config_that_changes_the_output(reports):
    for rep in reports:
        assert rep["faulty"]["output_spread"] > 1e-2
        assert rep["faulty"]["note"] and "suspect" in rep["faulty"]["note"]


def test_layer_candidates_come_from_the_library_declaration():
    """Each library names the baselines its layer check times (the first is the speed-up reference): v1's as
    shipped, V2's model choices, HybridEP's defaults; a skipped baseline stays out."""
    from deepep_tune.deepep.config import V1
    from deepep_tune.deepep.elastic import V2
    from deepep_tune.deepep.hybrid import HYBRID
    from deepep_tune.tune.search import SmsRow
    from deepep_tune.tune.verdicts import layer_candidates

    assert V1.layer_baselines[0] == "deepep_default_20sms"
    assert V2.layer_baselines == ("v2_model_overlap", "v2_model_no_overlap")
    assert HYBRID.layer_baselines[0] == "hybridep_default"
    facts = {"theoretical_num_sms": {"overlap": 22, "no_overlap": 64}}
    bases = V2.baselines(2, 132, facts)
    assert {b.name for b in bases} >= set(V2.layer_baselines)
    pick = V2.config("dispatch", 132)
    answer = SmsRow(132, pick, 500.0, V2.config("combine", 132), 480.0)
    bases[1].skipped = "num_sms 64 exceeds this run's limit"
    cands = layer_candidates(answer, [answer], bases, V2.layer_baselines)
    assert list(cands) == ["pick", bases[0].name] and bases[0].name == "v2_model_overlap"
    assert cands["v2_model_overlap"] == (bases[0].dispatch, bases[0].combine)
