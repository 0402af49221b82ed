"""Run under torchrun (gloo, CPU) by tests/test_refbuffer.py: each rank drives deepep_tune.refbuffer through
DeepEP's API and writes what it saw to OUT/rank<r>.json (the assertions live in the test)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepep_tune.deepep.buffer import align, nvl_bytes  # noqa: E402
from deepep_tune.deepep.check import check_combine, check_dispatch  # noqa: E402
from deepep_tune.deepep.config import TuneConfig, deepep_default  # noqa: E402
from deepep_tune.deepep.refbuffer import ReferenceBuffer, ReferenceConfig  # noqa: E402
from deepep_tune.deepep.routing import expected_for_rank, make_routing, token_values  # noqa: E402
from deepep_tune.deepep.workload import Workload  # noqa: E402

# The hand-worked case of tests/test_refbuffer.py: 2 ranks, 4 experts (2 per rank), 3 tokens, top-2.
HAND_IDX = {0: [[0, 3], [2, -1], [1, 0]], 1: [[3, 2], [0, 2], [-1, -1]]}
HAND_W = {0: [[0.5, 0.25], [1.0, 0.75], [0.125, 0.375]], 1: [[2.0, 4.0], [8.0, 16.0], [1.0, 1.0]]}
HAND_H = 16


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        return f"{type(e).__name__}: {e}"
    return None


def hand_case(rank):
    buf = ReferenceBuffer(dist.group.WORLD, align(10**6))
    idx = torch.tensor(HAND_IDX[rank], dtype=torch.int64)
    w = torch.tensor(HAND_W[rank], dtype=torch.float32)
    x = (10 * (rank + 1) + torch.arange(3, dtype=torch.float32))[:, None].expand(3, HAND_H).to(torch.bfloat16)
    x = x.contiguous()
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    cfg = ReferenceConfig(4, 2, 8, 6, 128)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w, expert_alignment=1, config=cfg)
    aligned = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, expert_alignment=4,
                           config=cfg)[3]
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w, config=ReferenceConfig(4, 1, 8, 6, 128))
    bias = torch.full((3, HAND_H), 0.5, dtype=torch.bfloat16)
    with_bias = buf.combine(recv_x, handle, bias=(bias, bias), config=cfg)[0]
    return {
        "num_tokens_per_rank": per_rank.tolist(), "rdma": per_rdma, "num_tokens_per_expert": per_expert.tolist(),
        "is_token_in_rank": in_rank.tolist(), "layout_dtypes": [str(per_rank.dtype), str(per_expert.dtype),
                                                                str(in_rank.dtype)],
        "recv_x": recv_x[:, 0].float().tolist(), "recv_x_rows_constant": bool((recv_x == recv_x[:, :1]).all()),
        "recv_topk_idx": recv_idx.tolist(), "recv_topk_weights": recv_w.tolist(), "counts": counts,
        "counts_aligned4": aligned, "combined": combined[:, 0].float().tolist(),
        "combined_weights": combined_w.tolist(), "combined_bias": with_bias[:, 0].float().tolist(),
        "recv_idx_dtype": str(recv_idx.dtype), "recv_w_dtype": str(recv_w.dtype), "combined_dtype": str(combined.dtype),
    }


def routed_case(rank, world, dtype, alignment):
    """DeepEP-test routing at a small workload, checked against routing.expected_for_rank."""
    w = Workload(num_tokens=40, hidden=256, num_topk=4, num_experts=4 * world, dispatch_dtype=dtype, seed=11,
                 expert_alignment=alignment)
    d_cfg, c_cfg = TuneConfig(8, 4, 64), TuneConfig(8, 2, 64)
    buf = ReferenceBuffer(dist.group.WORLD, align(max(nvl_bytes("dispatch", d_cfg, world, w),
                                                      nvl_bytes("combine", c_cfg, world, w))))
    rt = make_routing(w, rank, world)
    exp = expected_for_rank(w, rank, world)
    values = token_values(rank, w.num_tokens).float()
    rows = values[:, None].expand(w.num_tokens, w.hidden)
    x_bf16 = rows.to(torch.bfloat16).contiguous()
    if dtype == "fp8":
        scales = (values / 448.0)[:, None].expand(-1, w.hidden // 128).contiguous()
        x = ((rows / scales[:, :1]).to(torch.float8_e4m3fn), scales)
    else:
        x = x_bf16
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(rt.topk_idx, w.num_experts)
    out = {"layout_ok": bool(torch.equal(per_rank, rt.num_tokens_per_rank)
                             and torch.equal(per_expert, rt.num_tokens_per_expert)
                             and torch.equal(in_rank, rt.is_token_in_rank))}
    d = ReferenceConfig(d_cfg.num_sms, d_cfg.nvl_chunk, d_cfg.nvl_buffer, 6, 128)
    c = ReferenceConfig(c_cfg.num_sms, c_cfg.nvl_chunk, c_cfg.nvl_buffer, 6, 128)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=rt.topk_idx, topk_weights=rt.topk_weights, expert_alignment=alignment, config=d)
    xs, sc = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    out["dispatch"] = check_dispatch(exp, xs, sc, recv_idx, recv_w, counts, alignment)
    out["counts"] = counts
    out["expected_counts"] = exp.num_recv_per_expert
    out["n_recv"] = int(xs.shape[0])
    # cached dispatch (bf16 gradients in training) with the forward's handle: same rows, no top-k
    cached = buf.dispatch(x_bf16, handle=handle, config=d)
    out["cached_none"] = [v is None for v in cached[1:5]]
    out["cached"] = check_dispatch(exp, cached[0], None, None, None, None)
    cached_fp8 = buf.dispatch(x, handle=handle, config=d)[0]
    out["cached_keeps_type"] = isinstance(cached_fp8, tuple) == isinstance(x, tuple)
    # combine the received rows back: each row becomes value * copies; weights sum back to the originals
    combine_in = exp.recv_values.to(torch.bfloat16)[:, None].expand(-1, w.hidden).contiguous()
    combined, combined_w, _ = buf.combine(combine_in, handle, topk_weights=recv_w, config=c)
    out["combine"] = check_combine(exp, combined, values, combined_w, rt.topk_weights)
    # num_worst_tokens: output padded to the worst case, top-k -1 past the real rows, no per-expert list
    worst = w.num_tokens * world
    wx, widx, ww, wcounts, whandle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=rt.topk_idx, topk_weights=rt.topk_weights, num_worst_tokens=worst, config=d)
    wxs = wx[0] if isinstance(wx, tuple) else wx
    n = out["n_recv"]
    out["worst"] = {"rows": int(wxs.shape[0]), "counts": wcounts, "prefix_ok": bool(torch.equal(widx[:n], recv_idx)),
                    "tail_idx": sorted(set(widx[n:].flatten().tolist())),
                    "combine": check_combine(exp, buf.combine(
                        torch.cat([combine_in, torch.zeros(worst - n, w.hidden, dtype=torch.bfloat16)]), whandle,
                        config=c)[0], values, None, rt.topk_weights)}
    # a handle is tied to num_sms: another num_sms fails, other chunk/buffer sizes at the same num_sms work
    other = ReferenceConfig(12, 4, 64, 6, 128)
    out["combine_other_sms"] = _error(lambda: buf.combine(combine_in, handle, config=other))
    out["cached_other_sms"] = _error(lambda: buf.dispatch(x_bf16, handle=handle, config=other))
    out["combine_same_sms_other_chunk"] = _error(
        lambda: buf.combine(combine_in, handle, config=ReferenceConfig(8, 1, 32, 6, 128)))
    # the buffer must hold the config: one slot more than it was sized for fails
    big = ReferenceConfig(8, 4, 128, 6, 128)
    out["too_small"] = _error(lambda: buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=rt.topk_idx, topk_weights=rt.topk_weights, config=big))
    return out


def api_case(rank, world):
    w = Workload(num_tokens=16, hidden=128, num_topk=2, num_experts=2 * world, seed=2)
    default_need = max(nvl_bytes(op, deepep_default(op, world), world, w) for op in ("dispatch", "combine"))
    buf = ReferenceBuffer(dist.group.WORLD, align(default_need), explicitly_destroy=True)
    small = ReferenceBuffer(dist.group.WORLD, align(default_need) - 128 * 64)
    rt = make_routing(w, rank, world)
    x = token_values(rank, w.num_tokens).float()[:, None].expand(-1, w.hidden).to(torch.bfloat16).contiguous()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(rt.topk_idx, w.num_experts)
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
              topk_idx=rt.topk_idx, topk_weights=rt.topk_weights)
    out = {}
    # config=None: DeepEP's default table at Buffer.num_sms = 20, and the handle carries num_sms 20
    d_out = buf.dispatch(x, **kw)
    out["default_dispatch"] = check_dispatch(expected_for_rank(w, rank, world), d_out[0], None, d_out[1], d_out[2],
                                             d_out[3])
    out["default_handle_sms"] = d_out[4].num_sms
    out["default_combine"] = _error(lambda: buf.combine(d_out[0], d_out[4]))
    out["default_too_small"] = _error(lambda: small.dispatch(x, **kw))
    out["default_config"] = repr(ReferenceBuffer.get_dispatch_config(world)) + repr(
        ReferenceBuffer.get_combine_config(world))
    # events: only async_finish gives an event to wait on, as in DeepEP
    cfg = ReferenceConfig(20, 6, 256, 6, 128)
    out["sync_event_wait"] = _error(lambda: buf.dispatch(x, config=cfg, **kw)[5].current_stream_wait())
    out["async_event_wait"] = _error(lambda: buf.dispatch(x, config=cfg, async_finish=True, **kw)[5].current_stream_wait())
    out["alloc_on_comm_without_event"] = _error(
        lambda: buf.dispatch(x, config=cfg, async_finish=True, allocate_on_comm_stream=True, **kw))
    out["alloc_on_comm_with_event"] = _error(
        lambda: buf.dispatch(x, config=cfg, previous_event=buf.capture(), async_finish=True,
                             allocate_on_comm_stream=True, **kw)[5].current_stream_wait())
    out["cached_with_topk"] = _error(lambda: buf.dispatch(x, handle=d_out[4], topk_idx=rt.topk_idx, config=cfg))
    out["combine_fp32"] = _error(lambda: buf.combine(d_out[0].float(), d_out[4], config=cfg))
    out["dispatch_fp32"] = _error(lambda: buf.dispatch(x.float(), config=cfg, **kw))
    out["deep_ep_config_type"] = _error(lambda: buf.dispatch(x, config=object(), **kw))
    buf.destroy()
    out["after_destroy"] = _error(lambda: buf.get_dispatch_layout(rt.topk_idx, w.num_experts))
    return out


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world": world}
    if world == 2:
        report["hand"] = hand_case(rank)
    for dtype in ("bf16", "fp8"):
        for alignment in (1, 8):
            report[f"routed_{dtype}_{alignment}"] = routed_case(rank, world, dtype, alignment)
    report["api"] = api_case(rank, world)
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
