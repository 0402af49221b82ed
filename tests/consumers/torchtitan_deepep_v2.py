"""torchtitan DeepEP V2 path (ElasticBuffer).

Transcribed from pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a (2026-08-21)
torchtitan/distributed/deepep/deepep.py: import L44-50 (bound at module import), _DEEPEP_MULTINODE_NUM_SMS L109,
_resolve_dispatch_num_sms L112-126, _dispatch_op_impl L129-194 (num_sms resolved every call, passed explicitly),
_dispatch_backward L204-242 (combine, no num_sms -> handle.num_sms), _combine_op_impl L245-274 (combine, no num_sms,
async_with_compute_stream=True), _combine_backward L282-304 (cached dispatch, num_sms=handle.num_sms),
get_buffer L335-381 (no prefer_overlap_with_compute -> default True). Called from
torchtitan/models/common/token_dispatcher.py DeepEPTokenDispatcher.init_buffer L827-839 (eager, at wire-up).
Token permutation, handle-id smuggling, events and autograd registration are dropped."""

from __future__ import annotations

import torch
from deep_ep import ElasticBuffer        # L44-45: the class object is bound here, at import

_buffer = None
_DEEPEP_MULTINODE_NUM_SMS = 20           # L109


def _resolve_dispatch_num_sms(buffer, num_experts: int, num_topk: int) -> int:      # L112-126
    try:
        return buffer.get_theoretical_num_sms(num_experts, num_topk)
    except ZeroDivisionError:
        num_device_sms = torch.cuda.get_device_properties("cuda").multi_processor_count
        return min(_DEEPEP_MULTINODE_NUM_SMS, num_device_sms)


def get_buffer(group, *, hidden: int, num_max_tokens_per_rank: int, num_topk: int,
               use_fp8_dispatch: bool = False):                                     # L335-381
    global _buffer
    needed_bytes = ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk=num_topk,
                                                      use_fp8_dispatch=use_fp8_dispatch)
    if _buffer is not None and _buffer.group == group and _buffer.num_bytes >= needed_bytes:
        return _buffer
    _buffer = ElasticBuffer(group, num_bytes=needed_bytes, num_max_tokens_per_rank=num_max_tokens_per_rank,
                            hidden=hidden, num_topk=num_topk, use_fp8_dispatch=use_fp8_dispatch,
                            deterministic=torch.are_deterministic_algorithms_enabled(), explicitly_destroy=True)
    return _buffer


def reset() -> None:
    global _buffer
    _buffer = None


def dispatch_fwd(x, topk_idx, topk_weights, num_experts: int, num_tokens_per_rank: int, cudagraphable=False):
    num_sms = _resolve_dispatch_num_sms(_buffer, num_experts, topk_idx.shape[1])   # L159
    recv_x, recv_topk_idx, recv_scores, handle, _event = _buffer.dispatch(         # L160-172
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
        num_max_tokens_per_rank=num_tokens_per_rank, num_sms=num_sms,
        do_expand=cudagraphable, do_cpu_sync=not cudagraphable)
    return recv_x, recv_scores, handle


def dispatch_bwd(grad_recv_x, handle, grad_recv_scores=None):                      # L229-233
    grad_x, grad_scores, _event = _buffer.combine(
        grad_recv_x, handle=handle,
        topk_weights=grad_recv_scores.float() if grad_recv_scores is not None else None)
    return grad_x


def combine_fwd(x, handle):                                                        # L266-271
    combined, _w, _event = _buffer.combine(x, handle=handle, topk_weights=None, async_with_compute_stream=True)
    return combined


def combine_bwd(grad_combined, handle):                                            # L298-303
    grad_x, _idx, _scores, _handle, _event = _buffer.dispatch(
        grad_combined, handle=handle, num_sms=handle.num_sms, do_cpu_sync=False)
    return grad_x


def train_step(group, x, topk_idx, topk_weights, num_experts: int, num_max_tokens_per_rank: int = 4096) -> None:
    """init_buffer, then the four communication calls of one MoE layer's forward+backward."""
    get_buffer(group, hidden=x.shape[1], num_max_tokens_per_rank=num_max_tokens_per_rank,
               num_topk=topk_idx.shape[1])
    recv_x, recv_scores, handle = dispatch_fwd(x, topk_idx, topk_weights, num_experts, x.shape[0])
    out = combine_fwd(recv_x, handle)
    combine_bwd(out, handle)
    dispatch_bwd(recv_x, handle, recv_scores)
