"""Test-only CPU fake (tests/test_next_gen_runtime.py) of deep_ep/hybrid_ep_buffer.py @94a9f8f6: same constructor and dispatch/combine signatures and the same
flow (constructor -> hybrid_ep_cpp.Configurer; each handle-less dispatch -> update_template_config ->
configurer.get_default_config(); handle tuple carries the config; combine uses the handle's config)."""
import os

import torch

import hybrid_ep_cpp


def indices_to_map(topk_idx, topk_weights, num_of_tokens, num_of_experts):
    routing_map = torch.zeros(num_of_tokens, num_of_experts, dtype=torch.bool)
    routing_map = routing_map.scatter(1, topk_idx.to(torch.int64), 1).bool()
    probs = None
    if topk_weights is not None:
        probs = torch.zeros(num_of_tokens, num_of_experts, dtype=torch.float32)
        probs = probs.scatter(1, topk_idx.to(torch.int64), topk_weights)
    return routing_map, probs


_FIELDS7 = ("sparse_to_dense_map", "rdma_to_attn_map", "attn_to_rdma_map", "num_dispatched_tokens_tensor",
            "local_expert_routing_map", "num_of_tokens_per_rank", "config")
_FIELDS11 = ("sparse_to_dense_map", "rdma_to_attn_map", "attn_to_rdma_map", "num_dispatched_tokens_tensor",
             "local_expert_routing_map", "dense_chunk_layout", "dense_to_expert_map", "tokens_per_expert",
             "num_of_tokens_per_rank", "config", "overflow_flag")


def _pack(h, fields):
    return tuple(getattr(h, f) for f in fields)


def _unpack(t, fields):
    h = hybrid_ep_cpp.HandleImpl()
    for f, v in zip(fields, t):
        setattr(h, f, v)
    return h


class HybridEPBuffer:
    def __init__(self, group, hidden_dim: int, max_num_of_tokens_per_rank: int, num_local_experts: int,
                 use_fp8: bool = False, num_sms_dispatch_api: int = None, num_sms_combine_api: int = None,
                 num_sms_preprocessing_api: int = None, num_blocks_permute: int = None,
                 num_blocks_unpermute: int = None, load_cached_kernels: bool = False,
                 use_shared_buffer: bool = True, enable_custom_allgather: bool = False,
                 num_of_hybrid_ep_ranks_per_nvlink_domain: int = None, use_mnnvl: bool = None):
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        detected = hybrid_ep_cpp.ExtendedMemoryAllocator().detect_accessible_ranks(group)
        env_value = os.getenv("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        self.num_of_hybrid_ep_ranks_per_nvlink_domain = int(env_value) if env_value is not None else detected
        self.local_rank = self.rank % self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.node_rank = self.rank // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.num_of_nodes = self.group_size // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.configurer = hybrid_ep_cpp.Configurer(
            hidden_dim=hidden_dim, max_num_of_tokens_per_rank=max_num_of_tokens_per_rank,
            num_local_experts=num_local_experts, num_of_ranks_per_node=self.num_of_hybrid_ep_ranks_per_nvlink_domain,
            num_of_nodes=self.num_of_nodes, use_fp8=use_fp8, num_sms_dispatch_api=num_sms_dispatch_api,
            num_sms_combine_api=num_sms_combine_api, num_sms_preprocessing_api=num_sms_preprocessing_api,
            num_blocks_permute=num_blocks_permute, num_blocks_unpermute=num_blocks_unpermute)
        self.runtime = hybrid_ep_cpp.HybridEPBuffer(
            self.group, self.configurer.buffer_config, self.local_rank, self.node_rank, self.group_size,
            os.path.dirname(os.path.abspath(__file__)), load_cached_kernels=load_cached_kernels,
            use_shared_buffer=use_shared_buffer, enable_custom_allgather=enable_custom_allgather)

    def update_template_config(self, hidden_dim=None, num_of_tokens_per_rank=None, num_local_experts=None,
                               pad_multiple=None, use_fp8=None, fuse_permute_dispatch=False, **kwargs):
        config = self.configurer.get_default_config(fuse_permute_dispatch)
        if hidden_dim is not None:
            config.hidden_dim = hidden_dim
        if num_of_tokens_per_rank is not None:
            n = (num_of_tokens_per_rank + 15) // 16 * 16
            config.max_num_of_tokens_per_rank = max(n, self.configurer.buffer_config.max_num_of_tokens_per_rank)
            self.configurer.buffer_config.max_num_of_tokens_per_rank = config.max_num_of_tokens_per_rank
        if num_local_experts is not None:
            config.num_of_experts_per_rank = num_local_experts
        if pad_multiple is not None and pad_multiple > 0:
            config.pad_multiple = pad_multiple
        if use_fp8 is not None:
            config.token_data_type = hybrid_ep_cpp.UINT8 if use_fp8 else hybrid_ep_cpp.UINT16
        for key, value in kwargs.items():
            setattr(config, key, value)
        self.configurer.adjust_template(config, fuse_permute_dispatch)
        assert config.is_valid(fuse_permute_dispatch)
        self.runtime.update_buffer(config)
        return config

    def dispatch(self, hidden, scaling_factor=None, topk_idx=None, topk_weights=None, num_of_experts=None,
                 probs=None, routing_map=None, num_dispatched_tokens_tensor=None, num_dispatched_tokens=None,
                 handle=None):
        num_of_tokens, hidden_dim = hidden.shape
        if routing_map is not None:
            num_of_experts = routing_map.size(-1)
        elif topk_idx is not None:
            routing_map, probs = indices_to_map(topk_idx, topk_weights, num_of_tokens, num_of_experts)
        if handle is None:
            config = self.update_template_config(hidden_dim=hidden_dim, num_of_tokens_per_rank=num_of_tokens)
            h = self.runtime.metadata_preprocessing(config=config, routing_map=routing_map,
                                                    num_of_tokens_per_rank=num_of_tokens, enable_permute=False,
                                                    non_blocking=False)
        else:
            h = _unpack(handle, _FIELDS7)
        out, p, sf = self.runtime.dispatch(hidden=hidden, probs=probs, scaling_factor=scaling_factor, handle=h,
                                           with_probs=probs is not None)
        return out, p, sf, _pack(h, _FIELDS7)

    def combine(self, hidden, probs=None, handle=None):
        assert handle is not None
        h = _unpack(handle, _FIELDS7)
        return self.runtime.combine(hidden=hidden, probs=probs, handle=h, with_probs=probs is not None)

    def dispatch_with_permute(self, *, hidden, topk_idx=None, topk_weights=None, num_of_experts_per_rank=None,
                              num_of_experts=None, use_fp8=None, routing_map=None, probs=None, scaling_factor=None,
                              num_permuted_tokens=None, pad_multiple=None, handle=None, non_blocking=False,
                              fuse_permute_dispatch=False, num_dispatched_tokens=None, use_host_meta=None):
        num_of_tokens_per_rank, hidden_dim = hidden.shape
        if routing_map is not None:
            num_of_experts = routing_map.size(-1)
        elif topk_idx is not None:
            routing_map, probs = indices_to_map(topk_idx, topk_weights, num_of_tokens_per_rank, num_of_experts)
        if handle is None:
            config = self.update_template_config(hidden_dim=hidden_dim, num_of_tokens_per_rank=num_of_tokens_per_rank,
                                                 num_local_experts=num_of_experts_per_rank,
                                                 pad_multiple=pad_multiple, use_fp8=use_fp8,
                                                 fuse_permute_dispatch=fuse_permute_dispatch)
            h = self.runtime.metadata_preprocessing(config=config, routing_map=routing_map,
                                                    num_of_tokens_per_rank=num_of_tokens_per_rank,
                                                    num_permuted_tokens=num_permuted_tokens,
                                                    pad_multiple=pad_multiple, enable_permute=True,
                                                    fuse_permute_dispatch=fuse_permute_dispatch,
                                                    non_blocking=non_blocking)
        else:
            h = _unpack(handle, _FIELDS11)
            h.num_permuted_tokens = num_permuted_tokens
            h.padded_tokens_per_expert = h.tokens_per_expert
        out, p, sf = self.runtime.dispatch_with_permute(hidden=hidden, probs=probs, scaling_factor=scaling_factor,
                                                        handle=h, pad_multiple=pad_multiple,
                                                        fuse_permute_dispatch=fuse_permute_dispatch,
                                                        non_blocking=non_blocking, with_probs=probs is not None)
        return out, p, sf, h.padded_tokens_per_expert, _pack(h, _FIELDS11)

    def combine_with_unpermute(self, *, hidden, probs=None, handle=None, pad_multiple=None,
                               fuse_unpermute_combine=False, num_dispatched_tokens=None):
        assert handle is not None
        h = _unpack(handle, _FIELDS11)
        return self.runtime.combine_with_unpermute(hidden=hidden, probs=probs, handle=h, pad_multiple=pad_multiple,
                                                   fuse_unpermute_combine=fuse_unpermute_combine,
                                                   with_probs=probs is not None)
