"""deep_ep/hybrid_ep_buffer.py @94a9f8f, cut to what the tuner calls (constructor, update_template_config,
dispatch, combine), with the same flow and assertions; only the device follows the input instead of "cuda" and the
host sync before a handle-less dispatch is left out (no streams on CPU)."""

import os

import hybrid_ep_cpp
import torch


def indices_to_map(topk_idx, topk_weights, num_of_tokens, num_of_experts):
    routing_map = torch.zeros(num_of_tokens, num_of_experts, device=topk_idx.device, dtype=torch.bool)
    routing_map = routing_map.scatter(1, topk_idx.to(torch.int64), 1).bool()
    probs = None
    if topk_weights is not None:
        probs = torch.zeros(num_of_tokens, num_of_experts, device=topk_idx.device, dtype=torch.float32)
        probs = probs.scatter(1, topk_idx.to(torch.int64), topk_weights)
    return routing_map, probs


_FIELDS = ("sparse_to_dense_map", "rdma_to_attn_map", "attn_to_rdma_map", "num_dispatched_tokens_tensor",
           "local_expert_routing_map", "num_of_tokens_per_rank", "config")


class HybridEPBuffer:
    def __init__(self, group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, use_fp8=False,
                 num_sms_dispatch_api=None, num_sms_combine_api=None, num_sms_preprocessing_api=None,
                 num_blocks_permute=None, num_blocks_unpermute=None, load_cached_kernels=False,
                 use_shared_buffer=True, enable_custom_allgather=False,
                 num_of_hybrid_ep_ranks_per_nvlink_domain=None, use_mnnvl=None):
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        detected = hybrid_ep_cpp.ExtendedMemoryAllocator().detect_accessible_ranks(self.group)
        env_value = os.getenv("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        self.num_of_hybrid_ep_ranks_per_nvlink_domain = int(env_value) if env_value is not None else detected
        assert self.group_size % self.num_of_hybrid_ep_ranks_per_nvlink_domain == 0
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
            num_of_tokens_per_rank = (num_of_tokens_per_rank + 15) // 16 * 16
            config.max_num_of_tokens_per_rank = max(num_of_tokens_per_rank,
                                                    self.configurer.buffer_config.max_num_of_tokens_per_rank)
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
        assert config.is_valid(fuse_permute_dispatch), "The config is not valid."
        self.runtime.update_buffer(config)
        return config

    def dispatch(self, hidden, scaling_factor=None, topk_idx=None, topk_weights=None, num_of_experts=None,
                 probs=None, routing_map=None, num_dispatched_tokens_tensor=None, num_dispatched_tokens=None,
                 handle=None):
        num_of_tokens, hidden_dim = hidden.shape
        if routing_map is not None:
            assert routing_map.dtype == torch.bool
            num_of_experts = routing_map.size(-1)
        else:
            assert num_of_experts is not None, "The number of experts should be provided on index-based routing."
            if topk_idx is not None:
                routing_map, probs = indices_to_map(topk_idx, topk_weights, num_of_tokens, num_of_experts)
        assert handle is not None or routing_map is not None, "The handle and routing_map should not be both None"
        if handle is None:
            config = self.update_template_config(hidden_dim=hidden_dim, num_of_tokens_per_rank=num_of_tokens)
            handle_impl = self.runtime.metadata_preprocessing(config=config, routing_map=routing_map,
                                                              num_of_tokens_per_rank=num_of_tokens,
                                                              enable_permute=False, non_blocking=False)
        else:
            handle_impl = hybrid_ep_cpp.HandleImpl()
            for f, v in zip(_FIELDS, handle):
                setattr(handle_impl, f, v)
        token, out_probs, sf = self.runtime.dispatch(hidden=hidden, probs=probs, scaling_factor=scaling_factor,
                                                     handle=handle_impl, with_probs=probs is not None)
        return token, out_probs, sf, tuple(getattr(handle_impl, f) for f in _FIELDS)

    def combine(self, hidden, probs=None, handle=None):
        assert handle is not None, "The handle is necessary for combine."
        handle_impl = hybrid_ep_cpp.HandleImpl()
        for f, v in zip(_FIELDS, handle):
            setattr(handle_impl, f, v)
        return self.runtime.combine(hidden=hidden, probs=probs, handle=handle_impl, with_probs=probs is not None)
