"""torchtitan HybridEP path (deep_ep.HybridEPBuffer, DeepEP hybrid-ep branch).

Transcribed from pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a (2026-08-21)
torchtitan/distributed/deepep/hybridep.py: _NUM_SMS_DISPATCH/_NUM_SMS_COMBINE = 16/16 module constants L390-391
(no env var; the HYBRIDEP_NUM_SMS_* names of ecosystem.md §3a do not exist at this commit), get_buffer L394-452
(`from deep_ep import HybridEPBuffer` at call time L414, constructor kwargs L441-452, re-created only when group /
hidden / tokens / experts grow L423-430), _dispatch_impl L115-190 (dispatch_with_permute, no SM argument;
`from deep_ep.hybrid_ep_buffer import indices_to_map` L145), _combine_impl L224-237 (combine_with_unpermute),
_dispatch_bwd_impl L256-275 (cached dispatch_with_permute), _combine_bwd_impl L289-311 (combine_with_unpermute).
get_buffer is called eagerly by HybridEPTokenDispatcher.init_buffer (token_dispatcher.py L946-963)."""

from __future__ import annotations

_buffer = None
_NUM_SMS_DISPATCH = 16      # L390
_NUM_SMS_COMBINE = 16       # L391


def get_buffer(group, hidden_dim: int, num_max_tokens_per_rank: int, num_local_experts: int,
               fp8_dispatch: bool = False) -> None:                                       # L394-452
    global _buffer
    if fp8_dispatch:
        raise AssertionError("HybridEP FP8 dispatch not yet supported")
    from deep_ep import HybridEPBuffer                                                  # L414, at call time
    needs_reinit = (
        _buffer is None or _buffer.group != group
        or _buffer.configurer.buffer_config.hidden_dim < hidden_dim
        or _buffer.configurer.buffer_config.max_num_of_tokens_per_rank < num_max_tokens_per_rank
        or _buffer.configurer.buffer_config.num_of_experts_per_rank < num_local_experts)
    if needs_reinit:
        _buffer = HybridEPBuffer(group=group, hidden_dim=hidden_dim,
                                 max_num_of_tokens_per_rank=num_max_tokens_per_rank,
                                 num_local_experts=num_local_experts, use_fp8=fp8_dispatch,
                                 num_sms_dispatch_api=_NUM_SMS_DISPATCH, num_sms_combine_api=_NUM_SMS_COMBINE,
                                 load_cached_kernels=True, use_shared_buffer=True, enable_custom_allgather=True)


def reset() -> None:
    global _buffer
    _buffer = None


def dispatch_fwd(x, topk_idx, topk_weights, num_experts: int, ep_size: int, pad_multiple=None):    # L137-190
    num_local_experts = num_experts // ep_size
    from deep_ep.hybrid_ep_buffer import indices_to_map
    routing_map, probs = indices_to_map(topk_idx, topk_weights.float(), x.shape[0], num_experts)
    hidden, scores, _, tokens_per_expert, handle = _buffer.dispatch_with_permute(
        hidden=x, routing_map=routing_map, probs=probs, scaling_factor=None,
        num_of_experts_per_rank=num_local_experts, pad_multiple=pad_multiple,
        num_permuted_tokens=None, non_blocking=False)
    return hidden, scores, tokens_per_expert, handle


def combine_fwd(x, handle):                                                               # L236
    combined, _ = _buffer.combine_with_unpermute(hidden=x, handle=handle)
    return combined


def dispatch_bwd_of_combine(grad_combined, handle, num_permuted_tokens: int, pad_multiple=None):   # L268-274
    grad_x, _, _, _, _ = _buffer.dispatch_with_permute(hidden=grad_combined, scaling_factor=None, handle=handle,
                                                       num_permuted_tokens=num_permuted_tokens,
                                                       pad_multiple=pad_multiple)
    return grad_x


def combine_bwd_of_dispatch(grad_hidden, grad_scores, handle):                            # L302-306
    grad_x, grad_probs = _buffer.combine_with_unpermute(
        hidden=grad_hidden, probs=grad_scores if grad_scores.numel() > 0 else None, handle=handle)
    return grad_x


def train_step(group, x, topk_idx, topk_weights, num_experts: int, num_max_tokens_per_rank: int = 4096) -> None:
    get_buffer(group, x.shape[1], num_max_tokens_per_rank, num_experts // group.size())
    hidden, scores, _tpe, handle = dispatch_fwd(x, topk_idx, topk_weights, num_experts, group.size())
    out = combine_fwd(hidden, handle)
    dispatch_bwd_of_combine(out, handle, hidden.shape[0])
    combine_bwd_of_dispatch(hidden, scores, handle)
