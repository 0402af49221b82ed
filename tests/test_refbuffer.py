"""The CPU reference of deep_ep.Buffer/Config: DeepEP's API, semantics and rejections, over gloo."""

import json
import os
import subprocess
import sys

import pytest
from _helpers import ROOT, SUBPROCESS_TIMEOUT, subprocess_env

from deepep_tune.deepep.config import config_error
from deepep_tune.deepep.refbuffer import ReferenceBuffer, ReferenceConfig


# --- ReferenceConfig: the single validity rule ---------------------------------------------------------------
@pytest.mark.parametrize("args", [(3, 4, 64, 6, 128), (0, 4, 64, 6, 128), (-2, 4, 64, 6, 128), (8, 0, 64, 6, 128),
                                  (8, 64, 64, 6, 128), (8, 65, 64, 6, 128), (8, 4, 64, 0, 128), (8, 4, 64, 6, 0),
                                  (8, 4, 64, 128, 128)])
def test_config_rejects_what_deepep_rejects(args):
    assert config_error(*args) is not None
    with pytest.raises(RuntimeError, match="Assertion"):
        ReferenceConfig(*args)


@pytest.mark.parametrize("args", [(2, 1, 2, 6, 128), (24, 8, 256, 6, 128), (132, 31, 512, 6, 128)])
def test_config_accepts_what_deepep_accepts(args):
    c = ReferenceConfig(*args)
    assert (c.num_sms, c.nvl_chunk, c.nvl_buffer) == args[:3]


def test_config_defaults_and_types():
    c = ReferenceConfig()  # deep_ep.Config's C++ defaults
    assert (c.num_sms, c.nvl_chunk, c.nvl_buffer, c.rdma_chunk, c.rdma_buffer) == (20, 6, 256, 6, 256)
    with pytest.raises(TypeError):
        ReferenceConfig(8.0, 4, 64)


def test_default_tables_are_deepeps():
    for r, (d, c) in {2: ((24, 256), (10, 256)), 4: ((6, 256), (9, 256)), 8: ((6, 256), (4, 256))}.items():
        dc, cc = ReferenceBuffer.get_dispatch_config(r), ReferenceBuffer.get_combine_config(r)
        assert (dc.num_sms, dc.nvl_chunk, dc.nvl_buffer) == (20, *d)
        assert (cc.num_sms, cc.nvl_chunk, cc.nvl_buffer) == (20, *c)
    with pytest.raises(AssertionError):
        ReferenceBuffer.get_dispatch_config(3)


def test_size_hint_is_deepeps_example():
    # deepep_facts.md: 24 SMs, N=256, hidden 7168 BF16, 8 ranks -> 402,851,712 B
    assert ReferenceConfig(24, 6, 256, 6, 128).get_nvl_buffer_size_hint(7168 * 2, 8) == 402_851_712
    assert ReferenceConfig(24, 6, 256, 6, 128).get_rdma_buffer_size_hint(7168 * 2, 8) == 0


# --- under torchrun ------------------------------------------------------------------------------------------
def _run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"refbuf{world}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           os.path.join(ROOT, "tests", "data", "refbuffer_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(world)]


@pytest.fixture(scope="module")
def reports2(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def reports4(tmp_path_factory):
    return _run(4, tmp_path_factory)


# Worked by hand (tests/data/refbuffer_worker.py HAND_*): experts 0,1 on rank 0 and 2,3 on rank 1; row values
# 10*(rank+1)+token. Rank 0: t0->{0,3}, t1->{2,-1}, t2->{1,0}. Rank 1: t0->{3,2}, t1->{0,2}, t2->{-1,-1}.
HAND = {
    0: dict(num_tokens_per_rank=[2, 2], num_tokens_per_expert=[2, 1, 1, 1],
            is_token_in_rank=[[True, True], [False, True], [True, False]],
            recv_x=[10, 12, 21], recv_topk_idx=[[0, -1], [1, 0], [0, -1]],
            recv_topk_weights=[[0.5, 0], [0.125, 0.375], [8, 0]], counts=[3, 1], counts_aligned4=[4, 4],
            combined=[20, 11, 12], combined_weights=[[0.5, 0.25], [1.0, 0], [0.125, 0.375]],
            combined_bias=[21, 12, 13]),
    1: dict(num_tokens_per_rank=[1, 2], num_tokens_per_expert=[1, 0, 2, 1],
            is_token_in_rank=[[False, True], [True, True], [False, False]],
            recv_x=[10, 11, 20, 21], recv_topk_idx=[[-1, 1], [0, -1], [1, 0], [-1, 0]],
            recv_topk_weights=[[0, 0.25], [1.0, 0], [2, 4], [0, 16]], counts=[3, 2], counts_aligned4=[4, 4],
            combined=[20, 42, 0], combined_weights=[[2, 4], [8, 16], [0, 0]], combined_bias=[21, 43, 1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_hand_worked_dispatch_and_combine(reports2, rank):
    got = reports2[rank]["hand"]
    for key, want in HAND[rank].items():
        assert got[key] == want, key
    assert got["rdma"] is None and got["recv_x_rows_constant"]
    assert got["layout_dtypes"] == ["torch.int32", "torch.int32", "torch.bool"]
    assert (got["recv_idx_dtype"], got["recv_w_dtype"], got["combined_dtype"]) == (
        "torch.int64", "torch.float32", "torch.bfloat16")


def _routed_checks(reports):
    for rep in reports:
        for key in ("routed_bf16_1", "routed_bf16_8", "routed_fp8_1", "routed_fp8_8"):
            r = rep[key]
            assert r["layout_ok"], key
            assert r["dispatch"] is None and r["cached"] is None and r["combine"] is None, (key, r)
            assert r["n_recv"] > 0
            assert r["cached_none"] == [True] * 4 and r["cached_keeps_type"]
            align = int(key.rsplit("_", 1)[1])
            assert r["counts"] == [-(-c // align) * align for c in r["expected_counts"]]
            if align > 1:
                assert r["counts"] != r["expected_counts"]  # the alignment did something
            worst = r["worst"]
            assert worst["rows"] == 40 * len(reports) and worst["counts"] == [] and worst["prefix_ok"]
            assert worst["combine"] is None
            if worst["rows"] > r["n_recv"]:
                assert worst["tail_idx"] == [-1]
            for k in ("combine_other_sms", "cached_other_sms"):
                assert r[k] and r[k].startswith("RuntimeError") and "num_sms" in r[k], (key, k, r[k])
            assert r["combine_same_sms_other_chunk"] is None
            assert r["too_small"] and "NVL bytes" in r["too_small"]


@pytest.mark.slow
def test_routed_dispatch_combine_2_ranks(reports2):
    _routed_checks(reports2)


@pytest.mark.slow
def test_routed_dispatch_combine_4_ranks(reports4):
    _routed_checks(reports4)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["reports2", "reports4"])
def test_api_details(which, request):
    for rep in request.getfixturevalue(which):
        a = rep["api"]
        assert a["default_dispatch"] is None and a["default_combine"] is None
        assert a["default_handle_sms"] == 20
        assert a["default_too_small"] and "NVL bytes" in a["default_too_small"]
        assert a["sync_event_wait"].startswith("AssertionError")
        assert a["async_event_wait"] is None and a["alloc_on_comm_with_event"] is None
        assert a["alloc_on_comm_without_event"].startswith("RuntimeError")
        assert a["cached_with_topk"].startswith("AssertionError")
        assert a["combine_fp32"].startswith("RuntimeError") and "bf16" in a["combine_fp32"]
        assert a["dispatch_fp32"].startswith("RuntimeError")
        assert a["deep_ep_config_type"].startswith("TypeError")
        assert a["after_destroy"] and "destroyed" in a["after_destroy"]
