"""Correctness checks of dispatch/combine outputs, and the CPU reference backend that defines them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _helpers import ROOT, SUBPROCESS_TIMEOUT, subprocess_env

from deepep_tune.deepep.check import check_combine, check_dispatch
from deepep_tune.deepep.routing import expected_for_rank, make_routing, token_values
from deepep_tune.deepep.workload import Workload

W = Workload(num_tokens=64, hidden=256, num_topk=4, num_experts=16, seed=3)
R = 4


def _expected(w=W, me=1):
    return expected_for_rank(w, me, R)


def _dispatch_outputs(exp, hidden=W.hidden):
    recv_x = exp.recv_values[:, None].expand(-1, hidden).to(torch.bfloat16).contiguous()
    return recv_x, None, exp.recv_topk_idx.clone(), exp.recv_topk_weights.clone(), list(exp.num_recv_per_expert)


def _fp8_outputs(exp, hidden=W.hidden):
    values = exp.recv_values
    scales = (values / 448.0)[:, None].expand(-1, hidden // 128).contiguous()
    x = (values[:, None].expand(-1, hidden) / scales[:, :1]).to(torch.float8_e4m3fn)
    return x, scales, exp.recv_topk_idx.clone(), exp.recv_topk_weights.clone(), list(exp.num_recv_per_expert)


# --- check_dispatch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("me", range(R))
def test_check_dispatch_accepts_expected(me):
    exp = _expected(me=me)
    assert exp.recv_values.numel() > 0
    assert check_dispatch(exp, *_dispatch_outputs(exp)) is None
    assert check_dispatch(exp, *_fp8_outputs(exp)) is None
    # per-expert counts and top-k are optional outputs
    x, s, _, _, _ = _dispatch_outputs(exp)
    assert check_dispatch(exp, x, s, None, None, None) is None


def test_check_dispatch_corrupted_row():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    row = x.shape[0] // 2
    x[row, 7] += 1
    err = check_dispatch(exp, x, s, idx, w, cnt)
    assert err is not None and str(row) in err


def test_check_dispatch_rows_swapped():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    i = next(i for i in range(1, x.shape[0]) if exp.recv_values[i] != exp.recv_values[0])
    x[[0, i]] = x[[i, 0]]
    assert check_dispatch(exp, x, s, idx, w, cnt) is not None


def test_check_dispatch_missing_token():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    err = check_dispatch(exp, x[:-1], s, idx[:-1], w[:-1], cnt)
    assert err is not None and str(x.shape[0]) in err and str(x.shape[0] - 1) in err


def test_check_dispatch_extra_token():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    assert check_dispatch(exp, torch.cat([x, x[:1]]), s, idx, w, cnt) is not None


def test_check_dispatch_counts_differ():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    cnt[0] += 1
    cnt[1] -= 1
    err = check_dispatch(exp, x, s, idx, w, cnt)
    assert err is not None and "count" in err


def test_check_dispatch_topk_differ():
    exp = _expected()
    x, s, idx, w, cnt = _dispatch_outputs(exp)
    idx2 = idx.clone()
    idx2[0] = torch.roll(idx2[0], 1)
    if torch.equal(idx2, idx):
        idx2[0, 0] = -1 if idx2[0, 0] >= 0 else 0
    assert check_dispatch(exp, x, s, idx2, w, cnt) is not None
    w2 = w.clone()
    w2[-1] += 0.25
    assert check_dispatch(exp, x, s, idx, w2, cnt) is not None


def test_check_dispatch_fp8_bad_scale():
    exp = _expected()
    x, s, idx, w, cnt = _fp8_outputs(exp)
    s = s.clone()
    s[3, 1] *= 1.5  # one block of one row dequantises wrong
    err = check_dispatch(exp, x, s, idx, w, cnt)
    assert err is not None and "3" in err


# --- check_combine ----------------------------------------------------------------------------------------

def _combine_outputs(me=1):
    exp = _expected(me=me)
    rt = make_routing(W, me, R)
    own = token_values(me, W.num_tokens).float()
    copies = rt.is_token_in_rank.sum(1).float()
    combined = (own * copies)[:, None].expand(-1, W.hidden).to(torch.bfloat16).contiguous()
    return exp, combined, own, rt.topk_weights.clone(), rt.topk_weights


@pytest.mark.parametrize("me", range(R))
def test_check_combine_accepts_expected(me):
    exp, combined, own, w, orig = _combine_outputs(me)
    assert check_combine(exp, combined, own, w, orig) is None
    assert check_combine(exp, combined, own, None, orig) is None


def test_check_combine_corrupted_row():
    exp, combined, own, w, orig = _combine_outputs()
    combined[5, 0] = combined[5, 0] * 2
    err = check_combine(exp, combined, own, w, orig)
    assert err is not None and "5" in err


def test_check_combine_missing_copy():
    """A token whose contribution from one rank is lost sums to too little."""
    exp, combined, own, w, orig = _combine_outputs()
    t = int(torch.nonzero(exp.copies > 1)[0])
    combined[t] = (own[t] * (exp.copies[t] - 1)).to(torch.bfloat16)
    assert check_combine(exp, combined, own, w, orig) is not None


def test_check_combine_weights_differ():
    exp, combined, own, w, orig = _combine_outputs()
    w[2, 1] += 0.1
    assert check_combine(exp, combined, own, w, orig) is not None


# --- reference backend over gloo (2 ranks under torchrun) -----------------------------------------------------

@pytest.fixture(scope="module")
def reference_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "data", "reference_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_reference_backend_is_correct(reference_reports, dtype):
    for rep in reference_reports:
        r = rep[dtype]
        assert r["dispatch"] is None and r["combine"] is None and r["combine_first"] is None
        assert r["n_recv"] == r["n_expected"] > 0
        assert r["check_ok"] is None and r["combine_check_ok"] is None
        assert r["check_corrupt"] and "wrong data" in r["check_corrupt"]
        assert r["handle_mismatch"] and "num_sms" in r["handle_mismatch"]


@pytest.mark.slow
def test_measurements_agree_across_ranks(reference_reports):
    recs = [rep["records"] for rep in reference_reports]
    assert len(recs[0]) == len(recs[1]) == 4
    skip = {"t"}
    for a, b in zip(*recs):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    ok = [r for r in recs[0] if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        assert r["min_us"] <= r["time_us"] <= r["max_us"]
        assert r["time_us"] >= r["rank0_median_us"]  # the slowest rank decides
        assert r["iters"] == 3
    failed = recs[0][2]
    assert failed["status"] == "error" and failed["time_us"] is None
    assert "rank 0" in failed["error"] and "rank 1" in failed["error"] and "injected" in failed["error"]
