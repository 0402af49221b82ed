"""CPU fake of hybrid_ep_cpp (DeepEP branch hybrid-ep @94a9f8f6, csrc/hybrid_ep/config.cuh + pybind_hybrid_ep.cu).

Keeps where the SM counts live: Configurer(...) -> buffer_config.num_of_blocks_{dispatch,combine}_api
(defaults 24/24 on one node, 8/8 multi-node; config.cuh L365-381), get_default_config() copies them into a
HybridEpConfigInstance (L402-460), the instance travels in the handle, and dispatch/combine launch with the
handle's config (hybrid_ep.cu L171, L221). `HybridEPBuffer.calls` records what each launch really used. Test-only fake for tests/test_next_gen_runtime.py.
get_default_config reads the chunk/stage environment variables at each call (config.cuh L417-440) and
adjust_template lowers the stage counts to FAKE_MAX_STAGES, standing in for "until shared memory fits"."""
import copy
import os

UINT8, UINT16 = 1, 2


class BufferConfig:
    pass


class HybridEpConfigInstance:
    def is_valid(self, fuse_permute_dispatch=False):
        return True


class HandleImpl:
    pass


class ExtendedMemoryAllocator:
    def detect_accessible_ranks(self, process_group):
        return process_group.size()


class Configurer:
    FAKE_SM_COUNT = 132
    FAKE_MAX_STAGES = 64  # tests lower it to model adjust_template's shared-memory fitting

    def __init__(self, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, num_of_ranks_per_node,
                 num_of_nodes, use_fp8=False, num_sms_dispatch_api=None, num_sms_combine_api=None,
                 num_sms_preprocessing_api=None, num_blocks_permute=None, num_blocks_unpermute=None):
        self.sm_count = self.FAKE_SM_COUNT
        sms_dispatch = num_sms_dispatch_api if num_sms_dispatch_api is not None else (24 if num_of_nodes == 1 else 8)
        sms_combine = num_sms_combine_api if num_sms_combine_api is not None else (24 if num_of_nodes == 1 else 8)
        assert self.sm_count >= sms_dispatch and self.sm_count >= sms_combine
        self._num_blocks_permute = -1 if num_blocks_permute is None else num_blocks_permute
        self._num_blocks_unpermute = -1 if num_blocks_unpermute is None else num_blocks_unpermute
        bc = self.buffer_config = BufferConfig()
        bc.hidden_dim, bc.num_of_experts_per_rank = hidden_dim, num_local_experts
        bc.num_of_ranks_per_node, bc.num_of_nodes = num_of_ranks_per_node, num_of_nodes
        bc.num_of_blocks_dispatch_api, bc.num_of_blocks_combine_api = sms_dispatch, sms_combine
        bc.num_of_blocks_preprocessing_api = 108 if num_sms_preprocessing_api is None else num_sms_preprocessing_api
        bc.token_data_type = UINT8 if use_fp8 else UINT16
        bc.num_of_tokens_per_chunk_dispatch_api = bc.num_of_tokens_per_chunk_combine_api = 64
        bc.max_num_of_tokens_per_rank = (max(max_num_of_tokens_per_rank, 512) + 63) // 64 * 64

    def get_default_config(self, fuse_permute_dispatch=False):
        bc, c = self.buffer_config, HybridEpConfigInstance()
        for f in ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_ranks_per_node", "num_of_nodes",
                  "num_of_blocks_preprocessing_api", "num_of_blocks_dispatch_api", "num_of_blocks_combine_api",
                  "token_data_type"):
            setattr(c, f, getattr(bc, f))
        c.num_of_experts_per_rank = bc.num_of_experts_per_rank
        c.pad_multiple = 1
        env = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        c.num_of_tokens_per_chunk_dispatch_api = env("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", 64)
        c.num_of_tokens_per_chunk_combine_api = env("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", 64)
        c.num_of_stages_dispatch_api = env("NUM_OF_STAGES_DISPATCH_API", 10)
        c.num_of_stages_g2s_combine_api = env("NUM_OF_STAGES_G2S_COMBINE_API", 10 if bc.num_of_nodes == 1 else 5)
        if fuse_permute_dispatch:
            c.num_of_blocks_permute = min(108, self.sm_count - c.num_of_blocks_dispatch_api)
            c.num_of_blocks_unpermute = min(108, self.sm_count - c.num_of_blocks_combine_api)
        else:
            c.num_of_blocks_permute = c.num_of_blocks_unpermute = self.sm_count * 16
        if self._num_blocks_permute >= 0:
            c.num_of_blocks_permute = self._num_blocks_permute
        if self._num_blocks_unpermute >= 0:
            c.num_of_blocks_unpermute = self._num_blocks_unpermute
        return c

    def adjust_template(self, config, fuse_permute_dispatch=False):
        config.num_of_stages_dispatch_api = min(config.num_of_stages_dispatch_api, self.FAKE_MAX_STAGES)
        config.num_of_stages_g2s_combine_api = min(config.num_of_stages_g2s_combine_api, self.FAKE_MAX_STAGES)
        self.buffer_config.max_num_of_tokens_per_rank = max(self.buffer_config.max_num_of_tokens_per_rank,
                                                            config.max_num_of_tokens_per_rank)


class HybridEPBuffer:
    def __init__(self, group, buffer_config, local_rank, node_rank, group_size, library_root,
                 load_cached_kernels=False, use_shared_buffer=True, enable_custom_allgather=False):
        self.buffer_config = copy.copy(buffer_config)   # the C++ object keeps its own copy
        self.calls = []  # (op, SMs)
        self.launches = []  # (op, SMs, tokens per chunk, stages): dispatch stages / combine G2S stages

    def update_buffer(self, config):
        return False

    def metadata_preprocessing(self, config, routing_map, num_of_tokens_per_rank, num_permuted_tokens=None,
                               pad_multiple=None, enable_permute=False, fuse_permute_dispatch=False,
                               non_blocking=False):
        import torch
        h = HandleImpl()
        h.config = config
        h.sparse_to_dense_map = h.rdma_to_attn_map = h.attn_to_rdma_map = None
        h.num_dispatched_tokens_tensor = torch.tensor([num_of_tokens_per_rank])
        h.local_expert_routing_map = routing_map
        h.num_of_tokens_per_rank = num_of_tokens_per_rank
        h.dense_chunk_layout = h.dense_to_expert_map = None
        h.tokens_per_expert = routing_map.sum(0)[: config.num_of_experts_per_rank].to(torch.int64)
        h.padded_tokens_per_expert = h.tokens_per_expert
        h.overflow_flag = torch.zeros(1, dtype=torch.int32)
        h.num_permuted_tokens = num_permuted_tokens
        return h

    def _launch(self, op, handle):
        c = handle.config
        self.calls.append((op, c.num_of_blocks_dispatch_api if "dispatch" in op else c.num_of_blocks_combine_api))
        d = "dispatch" in op
        self.launches.append((op, c.num_of_blocks_dispatch_api if d else c.num_of_blocks_combine_api,
                              c.num_of_tokens_per_chunk_dispatch_api if d else c.num_of_tokens_per_chunk_combine_api,
                              c.num_of_stages_dispatch_api if d else c.num_of_stages_g2s_combine_api))

    def dispatch(self, *, hidden, probs, scaling_factor, handle, with_probs):
        self._launch("dispatch", handle)
        return hidden, probs, scaling_factor

    def combine(self, *, hidden, probs, handle, with_probs):
        self._launch("combine", handle)
        return hidden, probs

    def dispatch_with_permute(self, *, hidden, probs, scaling_factor, handle, pad_multiple, fuse_permute_dispatch,
                              non_blocking, with_probs):
        self._launch("dispatch_with_permute", handle)
        return hidden, probs, scaling_factor

    def combine_with_unpermute(self, *, hidden, probs, handle, pad_multiple, fuse_unpermute_combine, with_probs):
        self._launch("combine_with_unpermute", handle)
        return hidden, probs
