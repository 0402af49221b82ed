"""Workload validation, reproducible routing, and the expected per-rank layout."""

import pytest
import torch
from _helpers import ROOT  # noqa: F401

from deepep_tune.deepep.routing import (
    expected_for_rank,
    make_routing,
    token_values,
    traffic,
)
from deepep_tune.deepep.workload import Workload, workload_error

SMALL = Workload(num_tokens=64, hidden=256, num_topk=4, num_experts=16)


# --- workload_error ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,ranks", [
    (Workload(), 2), (Workload(), 4), (Workload(), 8),
    (SMALL, 4), (Workload(hidden=8176), 8), (Workload(hidden=16, num_topk=1, num_experts=2), 2),
    (Workload(num_experts=256, num_topk=32), 2),                 # exactly 128 local experts, top-32
    (Workload(hidden=7168, dispatch_dtype="fp8"), 8),
    (Workload(hidden=128, dispatch_dtype="fp8"), 8),
])
def test_workload_ok(w, ranks):
    assert workload_error(w, ranks) is None


@pytest.mark.parametrize("w,ranks,word", [
    (Workload(num_experts=15), 2, "num-experts"),
    (Workload(num_experts=100), 8, "num-experts"),
    (Workload(num_experts=0), 2, "num-experts"),
    (Workload(num_experts=264), 2, "128"),            # 132 local experts
    (Workload(num_experts=512), 2, "128"),
    (Workload(num_topk=33, num_experts=64), 2, "topk"),
    (Workload(num_topk=0), 2, "topk"),
    (Workload(num_topk=17, num_experts=16), 2, "topk"),  # more than there are experts
    (Workload(hidden=7160), 8, "hidden"),             # not a multiple of 16
    (Workload(hidden=8), 8, "hidden"),
    (Workload(hidden=8192), 8, "hidden"),             # > 8184
    (Workload(hidden=8184), 8, "hidden"),             # <= 8184 but not a multiple of 16
    (Workload(hidden=0), 8, "hidden"),
    (Workload(hidden=7168 + 16, dispatch_dtype="fp8"), 8, "hidden"),  # fp8 needs multiples of 128
    (Workload(hidden=2064, dispatch_dtype="fp8"), 8, "128"),
    (Workload(dispatch_dtype="fp16"), 8, "dtype"),
    (Workload(num_tokens=0), 8, "num-tokens"),
])
def test_workload_errors(w, ranks, word):
    err = workload_error(w, ranks)
    assert err is not None
    assert word in err


# --- routing ---------------------------------------------------------------------------------------------

def test_routing_reproducible_for_same_seed_and_rank():
    a, b = make_routing(SMALL, 1, 4), make_routing(SMALL, 1, 4)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weights, b.topk_weights)


def test_routing_differs_between_ranks_and_seeds():
    r = [make_routing(SMALL, k, 4).topk_idx for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(r[i], r[j])
    other_seed = Workload(num_tokens=64, hidden=256, num_topk=4, num_experts=16, seed=1)
    assert not torch.equal(make_routing(other_seed, 0, 4).topk_idx, r[0])


@pytest.mark.parametrize("w,ranks", [(SMALL, 4), (Workload(num_tokens=128, hidden=256, num_topk=8, num_experts=256), 8),
                                     (Workload(num_tokens=32, hidden=256, num_topk=1, num_experts=2), 2)])
def test_routing_layout_is_consistent(w, ranks):
    rt = make_routing(w, 0, ranks)
    idx = rt.topk_idx
    assert idx.shape == (w.num_tokens, w.num_topk) and rt.topk_weights.shape == idx.shape
    assert int(idx.min()) >= 0 and int(idx.max()) < w.num_experts
    for row in idx.tolist():
        assert len(set(row)) == len(row)  # an expert at most once per token
    assert bool(((rt.topk_weights >= 0.5) & (rt.topk_weights <= 1.5)).all())
    per_rank = w.num_experts // ranks
    in_rank = torch.zeros(w.num_tokens, ranks, dtype=torch.bool)
    for t, row in enumerate(idx.tolist()):
        for e in row:
            in_rank[t, e // per_rank] = True
    assert torch.equal(rt.is_token_in_rank, in_rank)
    assert rt.num_tokens_per_rank.tolist() == in_rank.sum(0).tolist()
    assert rt.num_tokens_per_expert.tolist() == [int((idx == e).sum()) for e in range(w.num_experts)]


def test_expected_for_rank_matches_independent_computation():
    w, R = SMALL, 4
    routings = [make_routing(w, r, R) for r in range(R)]
    per_rank = w.num_experts // R
    total = 0
    for me in range(R):
        exp = expected_for_rank(w, me, R)
        vals, srcs, idxs, wts = [], [], [], []
        for src, rt in enumerate(routings):
            values = token_values(src, w.num_tokens)
            for t in range(w.num_tokens):
                row = rt.topk_idx[t].tolist()
                if any(e // per_rank == me for e in row):
                    vals.append(float(values[t]))
                    srcs.append(src)
                    idxs.append([e - me * per_rank if e // per_rank == me else -1 for e in row])
                    wts.append([float(x) if e // per_rank == me else 0.0 for e, x in zip(row, rt.topk_weights[t].tolist())])
        assert exp.recv_values.tolist() == vals
        assert exp.recv_src.tolist() == srcs
        assert exp.recv_topk_idx.tolist() == idxs
        assert torch.allclose(exp.recv_topk_weights, torch.tensor(wts))
        counts = [sum(r.count(e) for r in idxs) for e in range(per_rank)]
        assert exp.num_recv_per_expert == counts
        copies = [len({e // per_rank for e in row}) for row in routings[me].topk_idx.tolist()]
        assert exp.copies.tolist() == copies
        total += len(vals)
    # every (token, destination rank) pair is received exactly once
    assert total == sum(int(rt.is_token_in_rank.sum()) for rt in routings)


def test_token_values_are_exact_in_bf16():
    for rank in range(8):
        v = token_values(rank, 4096).float()
        assert torch.equal(v.to(torch.bfloat16).float(), v)


def test_traffic_counts():
    tr = traffic(SMALL, 4)
    routings = [make_routing(SMALL, r, 4) for r in range(4)]
    for me in range(4):
        recv = sum(int(rt.is_token_in_rank[:, me].sum()) for rt in routings)
        assert tr.recv_rows[me] == recv
        assert tr.remote_rows[me] == recv - int(routings[me].is_token_in_rank[:, me].sum())
