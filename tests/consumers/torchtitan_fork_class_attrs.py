"""NousResearch torchtitan fork, class-attribute layout.

Transcribed from NousResearch/torchtitan@8b4b03d3b2e3f0c9b71f9c97e65a85cc477ce7c0 torchtitan/distributed/deepep/utils.py
(PrimusTurboDeepepManager.__init__/_get_deepep_config/dispatch/combine, DeepEPTokenDispatcher class attributes and
__init__) and its fused_a2a.py as in pytorch/torchtitan@0c9c4c035fbeb950797565a32880723fd2236b87 (the fork's own
fused_a2a.py is not in the stored index; utils.py calls it with exactly these arguments):
- get_buffer sizes the Buffer from Buffer.get_dispatch_config/get_combine_config(group.size());
- FusedDispatch.forward calls buffer.dispatch(...) without config=; backward buffer.combine(...) without config=;
- FusedCombine.forward buffer.combine(...) without config=; backward buffer.dispatch(handle=...) without config=;
- set_deepep_num_sms(n) -> Buffer.set_num_sms(n).
What the manager does with the tuned tuples: builds Config(deep_num_cus, *tuple) into self.dispatch_config /
self.combine_config and never uses them; DeepEPTokenDispatcher does not pass deep_num_cus (default 32)."""

from __future__ import annotations

from typing import Optional

_buffer = None


# ---- fused_a2a.py ---------------------------------------------------------------------------------------------
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


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False, use_cuda_num_token_per_expert=False, num_worst_tokens=0):
    """FusedDispatch.forward (no config=)."""
    buffer = get_buffer(group, get_hidden_bytes(x))
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(token_indices, num_experts)
    recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, _ = buffer.dispatch(
        x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, num_worst_tokens=num_worst_tokens)
    return recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle


def fused_dispatch_backward(group, handle, grad_output, grad_token_probs):
    buffer = get_buffer(group, get_hidden_bytes(grad_output))
    return buffer.combine(grad_output.contiguous(), handle, topk_weights=grad_token_probs.float())


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """FusedCombine.forward (no config=)."""
    buffer = get_buffer(group, get_hidden_bytes(x))
    combined_x, _, _ = buffer.combine(x, handle=handle)
    return combined_x


def fused_combine_backward(group, handle, grad_output):
    buffer = get_buffer(group, get_hidden_bytes(grad_output))
    return buffer.dispatch(grad_output.contiguous(), handle=handle)


def set_deepep_num_sms(num_sms):
    from deep_ep import Buffer
    Buffer.set_num_sms(num_sms)


# ---- utils.py ---------------------------------------------------------------------------------------------------
class PrimusTurboDeepepManager:
    def __init__(self, router_topk: int, num_experts: Optional[int] = None, backend_type: str = "deepep",
                 deep_num_cus: int = 32, num_worst_tokens: int = 0, dispatch_tuned_config: Optional[tuple] = None,
                 combine_tuned_config: Optional[tuple] = None, **_unused):
        from deep_ep import Config
        self.router_topk, self.num_experts, self.num_worst_tokens = router_topk, num_experts, num_worst_tokens
        self.deep_num_cus = deep_num_cus

        def _get_deepep_config(config: tuple):
            return Config(deep_num_cus, *config)

        self.dispatch_config = _get_deepep_config(dispatch_tuned_config) if dispatch_tuned_config is not None else None
        self.combine_config = _get_deepep_config(combine_tuned_config) if combine_tuned_config is not None else None

    def setup_metadata(self, top_scores, selected_indices):
        self.token_probs = top_scores.view(-1, self.router_topk)
        self.token_indices = selected_indices.view(-1, self.router_topk)

    def dispatch(self, hidden_states, group):
        # self.dispatch_config is not passed (utils.py dispatch -> fused_dispatch(...) arguments).
        hidden_states, dispatched_indices, dispatched_probs, num_tokens_per_expert, handle = fused_dispatch(
            hidden_states, self.token_indices, self.token_probs.float(), self.num_experts, group,
            num_worst_tokens=self.num_worst_tokens)
        self.handle, self.dispatched_probs = handle, dispatched_probs
        return hidden_states

    def combine(self, hidden_states, group):
        # self.combine_config is not passed (utils.py combine -> fused_combine(...) arguments).
        return fused_combine(hidden_states, group, self.handle)


class DeepEPTokenDispatcher:
    turbo_deepep_backend: str = "deepep"
    turbo_deepep_num_cus: int = 128
    turbo_deepep_dispatch_tuned_config: Optional[tuple] = (18, 512, 8, 128)
    turbo_deepep_combine_tuned_config: Optional[tuple] = (16, 256, 8, 128)

    def __init__(self, moe_router_topk: int, num_moe_experts: int):
        self.tp_size = 1
        set_deepep_num_sms(self.turbo_deepep_num_cus)
        self._comm_manager = PrimusTurboDeepepManager(
            router_topk=self.tp_size * moe_router_topk, num_experts=self.tp_size * num_moe_experts,
            backend_type=self.turbo_deepep_backend, num_worst_tokens=0,
            dispatch_tuned_config=self.turbo_deepep_dispatch_tuned_config,
            combine_tuned_config=self.turbo_deepep_combine_tuned_config)


def train_step(dispatcher: DeepEPTokenDispatcher, group, x, topk_idx, topk_weights) -> None:
    """token_dispatch, token_combine, then the two autograd backwards."""
    m = dispatcher._comm_manager
    m.setup_metadata(topk_weights, topk_idx)
    recv = m.dispatch(x, group)
    handle, probs = m.handle, m.dispatched_probs
    m.combine(recv, group)
    fused_dispatch_backward(group, handle, recv, probs)
    fused_combine_backward(group, handle, x)
