"""torchtitan v1-era DeepEP path: calls deep_ep.Buffer.dispatch/combine WITHOUT config=, sizes the Buffer from
Buffer.get_dispatch_config/get_combine_config. Transcribed from NousResearch/torchtitan@4b51b729a227663ffba02cf4ed8c54b6cbde46e9
torchtitan/distributed/deepep/deepep.py (same structure as pytorch/torchtitan between #2107 and #3808):
get_hidden_bytes, get_buffer, _dispatch_op_impl, _dispatch_backward, _combine_op_impl, _combine_backward."""

from __future__ import annotations

_buffer = None


def get_hidden_bytes(x) -> int:
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group, hidden_bytes: int):
    from deep_ep import Buffer
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def reset() -> None:
    global _buffer
    _buffer = None


def train_step(group, x, topk_idx, topk_weights, num_experts: int) -> None:
    """dispatch_tokens -> deepep::dispatch (fwd), deepep::combine (fwd), then both backwards. No config= anywhere."""
    buffer = get_buffer(group, get_hidden_bytes(x))
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx=topk_idx, num_experts=num_experts)
    recv_x, _, recv_scores, _, handle, _ = buffer.dispatch(
        x=x, topk_idx=topk_idx, topk_weights=topk_weights.float(), num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert)
    buffer.combine(x=recv_x, handle=handle)                                          # _combine_op_impl
    buffer.combine(x=recv_x, handle=handle, topk_weights=recv_scores.float())       # _dispatch_backward
    buffer.dispatch(x=x, handle=handle)                                             # _combine_backward (cached)
