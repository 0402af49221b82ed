"""Megatron-LM flex dispatcher, HybridEP backend (--moe-token-dispatcher-type flex
--moe-flex-dispatcher-backend hybridep).

Transcribed from NVIDIA/Megatron-LM@d98e8a64ddf34856e74b24714e3bedb2f5a39553 (2026-08-22):
- megatron/core/transformer/moe/fused_a2a.py: `from deep_ep import HybridEPBuffer` at module import L271-276;
  init_hybrid_ep_buffer L285-347 (only non-None SM/blocks kwargs are passed, so None -> HybridEP defaults 24/24
  single node, 8/8 multi-node); HybridEPDispatch.forward L363-446 (buffer created lazily on the FIRST forward,
  L400-414; later calls' num_sms_* arguments are ignored); HybridEPDispatch.backward L449-475
  (combine_with_unpermute); HybridEPCombine.forward L485-499 (combine_with_unpermute) and backward L502-515
  (cached dispatch_with_permute); hybrid_ep_dispatch/hybrid_ep_combine L521-603.
- megatron/core/transformer/moe/token_dispatcher.py _HybridEPManager.dispatch L1129-1181: num_sms_dispatch_api =
  num_sms_combine_api = config.moe_flex_dispatcher_num_sms (L1157-1158), num_sms_preprocessing_api =
  config.moe_hybridep_num_sms_preprocessing (108, L1164); combine L1183-1210.
- megatron/core/transformer/transformer_config.py L964-988 (moe_flex_dispatcher_num_sms: None; deprecated
  moe_deepep_num_sms / moe_hybridep_num_sms routed to it in __post_init__ L1792-1811).
The inspect-based fused-permute capability check (L383-398), padding of uneven inputs and over-budget tracking are
dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

try:
    from deep_ep import HybridEPBuffer          # L272: class bound at import of fused_a2a
    HAVE_HYBRIDEP = True
except ImportError:
    HAVE_HYBRIDEP = False

_hybrid_ep_buffer = None


def init_hybrid_ep_buffer(group, hidden_dim: int, num_tokens: int, num_local_experts: int,
                          num_sms_dispatch_api: Optional[int] = None, num_sms_combine_api: Optional[int] = None,
                          num_blocks_permute: Optional[int] = None, num_blocks_unpermute: Optional[int] = None,
                          fp8_dispatch: bool = False, num_sms_preprocessing_api: Optional[int] = None) -> None:
    global _hybrid_ep_buffer
    kwargs = {}
    if num_sms_dispatch_api is not None:
        kwargs['num_sms_dispatch_api'] = num_sms_dispatch_api
    if num_sms_combine_api is not None:
        kwargs['num_sms_combine_api'] = num_sms_combine_api
    if num_blocks_permute is not None:
        kwargs['num_blocks_permute'] = num_blocks_permute
    if num_blocks_unpermute is not None:
        kwargs['num_blocks_unpermute'] = num_blocks_unpermute
    if num_sms_preprocessing_api is not None:
        kwargs['num_sms_preprocessing_api'] = num_sms_preprocessing_api
    _hybrid_ep_buffer = HybridEPBuffer(group=group, hidden_dim=hidden_dim, max_num_of_tokens_per_rank=num_tokens,
                                       num_local_experts=num_local_experts, use_fp8=fp8_dispatch, **kwargs)


def reset_hybrid_ep_buffer():
    global _hybrid_ep_buffer
    _hybrid_ep_buffer = None


def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=None,
                       num_sms_combine_api=None, num_blocks_permute=None, num_blocks_unpermute=None, fused=False,
                       num_permuted_tokens=None, pad_multiple=None, num_sms_preprocessing_api=108):
    """HybridEPDispatch.forward (L363-446)."""
    if _hybrid_ep_buffer is None:
        num_tokens, hidden_dim = x.shape[-2:]
        init_hybrid_ep_buffer(group, hidden_dim, num_tokens, num_local_experts, num_sms_dispatch_api,
                              num_sms_combine_api, num_blocks_permute, num_blocks_unpermute, False,
                              num_sms_preprocessing_api)
    non_blocking = num_permuted_tokens is not None
    return _hybrid_ep_buffer.dispatch_with_permute(
        hidden=x, routing_map=routing_map, probs=probs, scaling_factor=None,
        num_of_experts_per_rank=num_local_experts, pad_multiple=pad_multiple,
        num_permuted_tokens=num_permuted_tokens, non_blocking=non_blocking,
        **({"fuse_permute_dispatch": fused} if fused else {}))


def hybrid_ep_dispatch_backward(grad_x, grad_probs, handle, pad_multiple=None, fused=False):      # L449-475
    return _hybrid_ep_buffer.combine_with_unpermute(hidden=grad_x, probs=grad_probs, handle=handle,
                                                    pad_multiple=pad_multiple,
                                                    **({"fuse_unpermute_combine": fused} if fused else {}))


def hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple, fused=False):                  # L485-499
    combined_hidden, _ = _hybrid_ep_buffer.combine_with_unpermute(
        hidden=x, handle=handle, pad_multiple=pad_multiple,
        **({"fuse_unpermute_combine": fused} if fused else {}))
    return combined_hidden


def hybrid_ep_combine_backward(grad_x, handle, num_permuted_tokens, pad_multiple=None, fused=False):  # L502-515
    dispatched, _, _, _, _ = _hybrid_ep_buffer.dispatch_with_permute(
        hidden=grad_x, scaling_factor=None, handle=handle, pad_multiple=pad_multiple,
        num_permuted_tokens=num_permuted_tokens, **({"fuse_permute_dispatch": fused} if fused else {}))
    return dispatched


@dataclass
class TransformerConfig:                          # the fields _HybridEPManager reads
    moe_flex_dispatcher_num_sms: Optional[int] = None
    moe_hybridep_num_blocks_permute: Optional[int] = None
    moe_hybridep_num_blocks_unpermute: Optional[int] = None
    moe_hybridep_num_sms_preprocessing: int = 108
    moe_permute_fusion_into_hybridep: bool = False


def train_step(group, config: TransformerConfig, x, routing_map, probs, num_local_experts: int) -> None:
    """_HybridEPManager.dispatch (L1150-1166) + combine (L1189-1195), then both backwards."""
    hidden, dprobs, _, tokens_per_expert, handle = hybrid_ep_dispatch(
        x=x, routing_map=routing_map, probs=probs.float(), group=group, num_local_experts=num_local_experts,
        num_sms_dispatch_api=config.moe_flex_dispatcher_num_sms,
        num_sms_combine_api=config.moe_flex_dispatcher_num_sms,
        num_blocks_permute=config.moe_hybridep_num_blocks_permute,
        num_blocks_unpermute=config.moe_hybridep_num_blocks_unpermute,
        num_permuted_tokens=None, pad_multiple=None, fused=config.moe_permute_fusion_into_hybridep,
        num_sms_preprocessing_api=config.moe_hybridep_num_sms_preprocessing)
    num_permuted_tokens = int(tokens_per_expert.sum())
    out = hybrid_ep_combine(hidden, handle, num_permuted_tokens, None, config.moe_permute_fusion_into_hybridep)
    hybrid_ep_combine_backward(out, handle, num_permuted_tokens)
    hybrid_ep_dispatch_backward(hidden, dprobs, handle)
