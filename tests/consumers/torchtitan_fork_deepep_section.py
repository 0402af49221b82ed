"""NousResearch torchtitan fork, [deepep] job-config layout.

Transcribed from NousResearch/torchtitan@1f8691ac44a495010ca3c5bd18839f4d4c4ba329 torchtitan/distributed/deepep/deepep.py:
module globals _tuned_dispatch_config/_tuned_combine_config, _dispatch_op_impl (config=_tuned_dispatch_config),
_dispatch_backward (combine, config=_tuned_combine_config), _combine_op_impl (config=_tuned_combine_config),
_combine_backward (cached dispatch, config=_tuned_dispatch_config), get_hidden_bytes, get_buffer (sized from
Buffer.get_dispatch_config/get_combine_config), dispatch_tokens (calls get_buffer before every dispatch),
set_tuned_configs, _detect_internode, run_deepep_autotune_if_enabled (the autotune = false branch: chunks hard-coded
6 / 4), and the DeepEP dataclass of torchtitan/config/job_config.py@760344338ab781c11705494570fd80e96ee0d556
(fields num_sms=24, nvl_buffer_size=256, rdma_buffer_size=128, autotune=False, ...; no chunk fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_buffer = None
_tuned_dispatch_config = None
_tuned_combine_config = None


@dataclass
class DeepEP:  # job_config.py [deepep]
    sync_comm_stream: bool = False
    fused_weighted_scatter_add: bool = False
    fused_silu_gate_prob: bool = False
    autotune: bool = False
    autotune_warmup: int = 5
    autotune_repeat: int = 10
    autotune_verbose: bool = False
    num_sms: int = 24
    nvl_buffer_size: int = 256
    rdma_buffer_size: int = 128


def reset() -> None:
    global _buffer, _tuned_dispatch_config, _tuned_combine_config
    _buffer = _tuned_dispatch_config = _tuned_combine_config = None


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


def set_tuned_configs(dispatch_config=None, combine_config=None) -> None:
    global _tuned_dispatch_config, _tuned_combine_config
    _tuned_dispatch_config = dispatch_config
    _tuned_combine_config = combine_config


def get_tuned_configs():
    return _tuned_dispatch_config, _tuned_combine_config


def _detect_internode(buffer):
    num_rdma_ranks = buffer.runtime.get_num_rdma_ranks()
    return num_rdma_ranks > 1, buffer.group_size, max(num_rdma_ranks, 1)


def run_deepep_autotune_if_enabled(deepep_config, ep_group, num_tokens: int, hidden: int, num_experts: int,
                                   num_topk: int) -> Optional[object]:
    from deep_ep import Buffer, Config
    if deepep_config is None or not getattr(deepep_config, "autotune", False):
        num_sms = getattr(deepep_config, "num_sms", 24) if deepep_config else 24
        nvl_buffer = getattr(deepep_config, "nvl_buffer_size", 256) if deepep_config else 256
        rdma_buffer = getattr(deepep_config, "rdma_buffer_size", 128) if deepep_config else 128
        hidden_bytes = hidden * 2  # bfloat16
        buffer = get_buffer(ep_group, hidden_bytes)
        is_internode, _, _ = _detect_internode(buffer)
        if is_internode:
            default_dispatch = (6, nvl_buffer, 8, rdma_buffer)
            default_combine = (4, nvl_buffer, 8, rdma_buffer)
        else:
            default_dispatch = (6, nvl_buffer)
            default_combine = (4, nvl_buffer)
        Buffer.set_num_sms(num_sms)
        set_tuned_configs(dispatch_config=Config(num_sms, *default_dispatch),
                          combine_config=Config(num_sms, *default_combine))
        return None
    raise NotImplementedError("transcription covers autotune = false only (autotune runs the fork's own search)")


def train_step(group, x, topk_idx, topk_weights, num_experts: int) -> None:
    """dispatch_tokens (get_buffer, layout, deepep::dispatch), deepep::combine, then both backwards."""
    buffer = get_buffer(group, get_hidden_bytes(x))
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx=topk_idx, num_experts=num_experts)
    recv_x, _, recv_scores, _, handle, _ = _buffer.dispatch(
        x=x, topk_idx=topk_idx, topk_weights=topk_weights.float(), num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, config=_tuned_dispatch_config)
    _buffer.combine(x=recv_x, handle=handle, config=_tuned_combine_config)                     # _combine_op_impl
    _buffer.combine(x=recv_x, handle=handle, topk_weights=recv_scores.float(),
                    config=_tuned_combine_config)                                                # _dispatch_backward
    _buffer.dispatch(x=x, topk_idx=None, topk_weights=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                     is_token_in_rank=None, num_tokens_per_expert=None, handle=handle,
                     config=_tuned_dispatch_config)                                              # _combine_backward
