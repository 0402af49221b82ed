"""CPU stand-in of hybrid_ep_cpp (DeepEP branch hybrid-ep @94a9f8f: csrc/hybrid_ep/config.cuh, hybrid_ep.cu,
jit/compiler.cu, buffer/intranode.cu), moving real tokens over the buffer's (gloo) process group.

Kept from the real library, because the tuner's backend depends on them:
- Configurer: SM defaults 24/24 (one node) and the C assert `sm_count >= sms` (here: the process aborts, as a
  failed C assert does); BufferConfig validity -> RuntimeError; get_default_config() reads the chunk/stage
  environment variables at every call and copies buffer_config.num_of_blocks_* into the config;
  adjust_template() lowers stages that do not fit shared memory (same layout formulas).
- HybridEPBuffer.update_buffer: a chunk change (or growth) re-allocates, which is collective (an all_gather on the
  group, as exchange_remote_nvl_info), so ranks out of lockstep hang, as on the GPU.
- Kernel cache keyed like jit/compiler.cu (dispatch key includes forward_dispatch_api, combine key
  backward_combine_api): a new key "compiles" (sleeps FAKE_HYBRID_JIT_S seconds) and is counted. The next
  FAKE_HYBRID_COLD_CALLS launches of a just-compiled kernel sleep FAKE_HYBRID_COLD_S each (a GPU's first launches
  after a compile: module load, cold caches), so a test sees whether timings wait until a new config is warm.
- Outputs: dispatch rows ordered by (source rank, source token), one per token with an expert on this rank;
  recv probs [N, experts of the node]; combine = sum over destination ranks (fp32 accumulate, bf16 out).
- The handle's local_expert_routing_map: [T * ranks, local experts] bool, row i (i < dispatched tokens) the local
  experts of received row i; the rows past them are unspecified (torch::empty): here True, so that a caller who
  does not cut them off at handle[3] gets wrong counts.
`HybridEPBuffer.launches` records the config every kernel really ran with (what the tests inspect)."""

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

UINT8, UINT16 = "uint8_t", "uint16_t"
FAKE_SM_COUNT = int(os.environ.get("FAKE_HYBRID_SM_COUNT", "132"))
FAKE_MAX_SMEM = 232448  # H100/H200 cudaDevAttrMaxSharedMemoryPerBlockOptin


def _env(name, default):
    v = os.environ.get(name)
    return int(v) if v is not None else default


class BufferConfig:
    def is_valid(self):
        ok = self.hidden_dim % (512 if self.token_data_type == UINT8 else 16) == 0
        ok &= (self.num_of_experts_per_rank * self.num_of_ranks_per_node) % 4 == 0
        ok &= (self.num_of_tokens_per_chunk_dispatch_api * self.num_of_ranks_per_node) % 4 == 0
        return ok

    def __repr__(self):
        keys = ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_experts_per_rank", "num_of_ranks_per_node",
                "num_of_blocks_dispatch_api", "num_of_blocks_combine_api", "num_of_tokens_per_chunk_dispatch_api",
                "num_of_tokens_per_chunk_combine_api")
        return "<BufferConfig " + " ".join(f"{k}={getattr(self, k)}" for k in keys) + ">"


class HybridEpConfigInstance:
    def is_valid(self, fuse_permute_dispatch=False):
        ok = self.hidden_dim % 16 == 0
        ok &= (self.num_of_experts_per_rank * self.num_of_ranks_per_node) % 4 == 0
        ok &= (self.num_of_tokens_per_chunk_dispatch_api * self.num_of_ranks_per_node) % 4 == 0
        return ok


class HandleImpl:
    pass


class ExtendedMemoryAllocator:
    def detect_accessible_ranks(self, process_group):
        return process_group.size()


def _pad(n, chunk):
    return -(-n // chunk) * chunk


def _up(x, a):
    return -(-x // a) * a


def _smem(c, op):
    """config.cuh compute_smem_sizes, one node, bf16."""
    probs_per_stage = c.num_of_experts_per_rank * c.num_of_ranks_per_node * 4
    if op == "dispatch":
        s = c.num_of_stages_dispatch_api
        off = _up(s * c.hidden_dim * 2, 128) + 2 * c.num_of_tokens_per_chunk_dispatch_api * c.num_of_ranks_per_node * 4
        if c.forward_dispatch_api:
            off = _up(off, 16) + s * probs_per_stage
        return _up(_up(off, 8) + s * 16 + 24, 128)
    g, s2 = c.num_of_stages_g2s_combine_api, c.num_of_stages_s2g_combine_api
    off = _up(g * c.hidden_dim * 2, 128) + s2 * c.hidden_dim * 2
    if c.backward_combine_api:
        off = _up(_up(off, 16) + g * probs_per_stage, 16) + s2 * probs_per_stage
    return _up(_up(off, 8) + g * 16 + g, 128)


class Configurer:
    def __init__(self, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, num_of_ranks_per_node,
                 num_of_nodes, use_fp8=False, num_sms_dispatch_api=None, num_sms_combine_api=None,
                 num_sms_preprocessing_api=None, num_blocks_permute=None, num_blocks_unpermute=None):
        self.sm_count = FAKE_SM_COUNT
        sd = num_sms_dispatch_api if num_sms_dispatch_api is not None else (24 if num_of_nodes == 1 else 8)
        sc = num_sms_combine_api if num_sms_combine_api is not None else (24 if num_of_nodes == 1 else 8)
        self._permute = -1 if num_blocks_permute is None else num_blocks_permute
        self._unpermute = -1 if num_blocks_unpermute is None else num_blocks_unpermute
        if not (self.sm_count >= sd and self.sm_count >= sc):
            # config.cuh: assert(sm_count >= sms_dispatch && sm_count >= sms_combine) -- a C assert aborts
            print("hybrid_ep_cpp: config.cuh: Configurer: Assertion `sm_count >= sms_dispatch && sm_count >= "
                  "sms_combine' failed.", file=sys.stderr, flush=True)
            os.abort()
        bc = self.buffer_config = BufferConfig()
        bc.hidden_dim, bc.num_of_experts_per_rank = hidden_dim, num_local_experts
        bc.num_of_ranks_per_node, bc.num_of_nodes = num_of_ranks_per_node, num_of_nodes
        bc.num_of_blocks_dispatch_api, bc.num_of_blocks_combine_api = sd, sc
        bc.num_of_blocks_preprocessing_api = 108 if num_sms_preprocessing_api is None else num_sms_preprocessing_api
        bc.token_data_type = UINT8 if use_fp8 else UINT16
        bc.num_of_tokens_per_chunk_dispatch_api = _env("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", 64)
        bc.num_of_tokens_per_chunk_combine_api = _env("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", 64)
        bc.max_num_of_tokens_per_rank = _pad(max(max_num_of_tokens_per_rank, 512), bc.num_of_tokens_per_chunk_combine_api)
        bc.num_of_dispatch_chunks = (bc.max_num_of_tokens_per_rank - 1) // bc.num_of_tokens_per_chunk_dispatch_api + 1
        bc.num_of_combine_chunks = (bc.max_num_of_tokens_per_rank - 1) // bc.num_of_tokens_per_chunk_combine_api + 1
        if not bc.is_valid():
            raise RuntimeError("The buffer config is not valid.")

    def get_default_config(self, fuse_permute_dispatch=False):
        bc, c = self.buffer_config, HybridEpConfigInstance()
        for f in ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_experts_per_rank", "num_of_ranks_per_node",
                  "num_of_nodes", "num_of_blocks_preprocessing_api", "num_of_blocks_dispatch_api",
                  "num_of_blocks_combine_api", "token_data_type"):
            setattr(c, f, getattr(bc, f))
        c.num_of_tokens_per_chunk_preprocessing_api = _env("NUM_OF_TOKENS_PER_CHUNK_PREPROCESSING_API", 64)
        c.forward_dispatch_api = c.backward_combine_api = True
        c.num_of_stages_dispatch_api = _env("NUM_OF_STAGES_DISPATCH_API", 10)
        c.num_of_in_flight_s2g_dispatch_api = _env("NUM_OF_IN_FLIGHT_S2G_DISPATCH_API", 8)
        c.num_of_tokens_per_chunk_dispatch_api = _env("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", 64)
        c.num_of_stages_g2s_combine_api = _env("NUM_OF_STAGES_G2S_COMBINE_API", 10 if bc.num_of_nodes == 1 else 5)
        c.num_of_stages_s2g_combine_api = _env("NUM_OF_STAGES_S2G_COMBINE_API", 2)
        c.num_of_tokens_per_chunk_combine_api = _env("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", 64)
        c.pad_multiple = 1
        if fuse_permute_dispatch:
            c.num_of_blocks_permute = min(108, self.sm_count - c.num_of_blocks_dispatch_api)
            c.num_of_blocks_unpermute = min(108, self.sm_count - c.num_of_blocks_combine_api)
        else:
            c.num_of_blocks_permute = c.num_of_blocks_unpermute = self.sm_count * 16
        if self._permute >= 0:
            c.num_of_blocks_permute = self._permute
        if self._unpermute >= 0:
            c.num_of_blocks_unpermute = self._unpermute
        return c

    def adjust_template(self, config, fuse_permute_dispatch=False):
        c = config
        c.max_num_of_tokens_per_rank = _pad(c.max_num_of_tokens_per_rank, c.num_of_tokens_per_chunk_combine_api)
        while _smem(c, "dispatch") > FAKE_MAX_SMEM and c.num_of_stages_dispatch_api > 2:
            c.num_of_stages_dispatch_api -= 1
        c.num_of_in_flight_s2g_dispatch_api = min(c.num_of_in_flight_s2g_dispatch_api, c.num_of_stages_dispatch_api - 1)
        while _smem(c, "combine") > FAKE_MAX_SMEM and c.num_of_stages_g2s_combine_api > 2:
            c.num_of_stages_g2s_combine_api -= 1
        c.num_of_stages_g2s_combine_api = max(2, c.num_of_stages_g2s_combine_api // 2 * 2)
        self.buffer_config.max_num_of_tokens_per_rank = max(self.buffer_config.max_num_of_tokens_per_rank,
                                                            c.max_num_of_tokens_per_rank)


DISPATCH_KEY = ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_experts_per_rank", "num_of_ranks_per_node",
                "num_of_stages_dispatch_api", "num_of_in_flight_s2g_dispatch_api",
                "num_of_tokens_per_chunk_dispatch_api", "num_of_blocks_dispatch_api", "forward_dispatch_api")
COMBINE_KEY = ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_experts_per_rank", "num_of_ranks_per_node",
               "num_of_stages_g2s_combine_api", "num_of_stages_s2g_combine_api", "num_of_tokens_per_chunk_combine_api",
               "num_of_blocks_combine_api", "backward_combine_api")
PREPROCESS_KEY = ("hidden_dim", "max_num_of_tokens_per_rank", "num_of_experts_per_rank", "num_of_ranks_per_node",
                  "num_of_tokens_per_chunk_preprocessing_api", "num_of_blocks_preprocessing_api")


class HybridEPBuffer:
    """The C++ runtime. Tests may set `corrupt_dispatch_row` (a received row index) to make dispatch wrong."""

    corrupt_dispatch_row = None

    def __init__(self, group, buffer_config, local_rank, node_rank, group_size, library_root,
                 load_cached_kernels=False, use_shared_buffer=True, enable_custom_allgather=True):
        self.group, self.rank, self.world = group, dist.get_rank(group), group_size
        self.buffer_config = copy.copy(buffer_config)  # the C++ object keeps its own copy
        self.kernels, self.compiles, self.launches, self.reallocations = set(), [], [], 0
        self.cold = {}  # kernel key -> launches left that still run slow after its compile
        self._exchange()

    def _exchange(self):
        # exchange_remote_nvl_info: every rank takes part in every (re-)allocation
        t = torch.tensor([self.buffer_config.num_of_tokens_per_chunk_dispatch_api], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        if len({int(x) for x in out}) != 1:
            raise RuntimeError(f"ranks re-allocated with different chunk sizes: {[int(x) for x in out]}")

    def update_buffer(self, config):
        bc, changed = self.buffer_config, False
        for f in ("max_num_of_tokens_per_rank", "hidden_dim", "num_of_experts_per_rank"):
            if getattr(config, f) > getattr(bc, f):
                setattr(bc, f, getattr(config, f))
                changed = True
        for f in ("num_of_tokens_per_chunk_dispatch_api", "num_of_tokens_per_chunk_combine_api"):
            if getattr(bc, f) != getattr(config, f):
                setattr(bc, f, getattr(config, f))
                changed = True
        if changed:
            self.reallocations += 1
            self._exchange()
        return changed

    def _kernel(self, kind, config, fields):
        key = (kind,) + tuple(getattr(config, f) for f in fields)
        if key not in self.kernels:
            time.sleep(float(os.environ.get("FAKE_HYBRID_JIT_S", "0")))  # the JIT compile
            self.kernels.add(key)
            self.compiles.append(key)
            self.cold[key] = int(os.environ.get("FAKE_HYBRID_COLD_CALLS", "0"))
        elif self.cold.get(key):
            self.cold[key] -= 1
            time.sleep(float(os.environ.get("FAKE_HYBRID_COLD_S", "0")))

    def _launch(self, op, config):
        fields = {"dispatch": ("num_of_blocks_dispatch_api", "num_of_tokens_per_chunk_dispatch_api",
                               "num_of_stages_dispatch_api", "forward_dispatch_api"),
                  "combine": ("num_of_blocks_combine_api", "num_of_tokens_per_chunk_combine_api",
                              "num_of_stages_g2s_combine_api", "backward_combine_api")}[op]
        self.launches.append((op,) + tuple(getattr(config, f) for f in fields))

    def metadata_preprocessing(self, config, routing_map, num_of_tokens_per_rank, num_permuted_tokens=None,
                               pad_multiple=None, enable_permute=False, fuse_permute_dispatch=False,
                               non_blocking=False):
        self._kernel("preprocess", config, PREPROCESS_KEY)
        maps = [torch.empty_like(routing_map) for _ in range(self.world)]
        dist.all_gather(maps, routing_map.contiguous(), group=self.group)  # all_gather_into_tensor in the real one
        epr = config.num_of_experts_per_rank
        # per source rank: which of its tokens have an expert on each rank
        to_rank = [m.view(m.shape[0], self.world, epr).any(-1) for m in maps]
        h = HandleImpl()
        h.config = config
        h.sparse_to_dense_map = torch.stack(to_rank)  # [src, T, dst]
        h.rdma_to_attn_map = h.attn_to_rdma_map = None
        n = int(sum(int(t[:, self.rank].sum()) for t in to_rank))
        h.num_dispatched_tokens_tensor = torch.tensor([n], dtype=torch.int32)
        # received rows in (source rank, token) order, each with the local experts it goes to
        mine = torch.cat([m[to_rank[s][:, self.rank]][:, self.rank * epr:(self.rank + 1) * epr]
                          for s, m in enumerate(maps)])
        h.local_expert_routing_map = torch.ones(num_of_tokens_per_rank * self.world, epr, dtype=torch.bool)
        h.local_expert_routing_map[:n] = mine
        h.num_of_tokens_per_rank = num_of_tokens_per_rank
        return h

    def dispatch(self, *, hidden, probs=None, scaling_factor=None, handle, with_probs):
        config = copy.copy(handle.config)
        config.forward_dispatch_api = with_probs
        self._kernel("dispatch", config, DISPATCH_KEY)
        self._launch("dispatch", config)
        sel = handle.sparse_to_dense_map[:, :, self.rank]  # [src, T]
        xs = [torch.empty_like(hidden) for _ in range(self.world)]
        dist.all_gather(xs, hidden.contiguous(), group=self.group)
        out = torch.cat([xs[s][sel[s]] for s in range(self.world)])
        if self.corrupt_dispatch_row is not None and out.shape[0] > self.corrupt_dispatch_row:
            out[self.corrupt_dispatch_row] += 1
        out_probs = None
        if with_probs:
            ps = [torch.empty_like(probs) for _ in range(self.world)]
            dist.all_gather(ps, probs.contiguous(), group=self.group)
            out_probs = torch.cat([ps[s][sel[s]] for s in range(self.world)])
        return out, out_probs, None

    def combine(self, *, hidden, probs=None, handle, with_probs):
        config = copy.copy(handle.config)
        config.backward_combine_api = with_probs
        self._kernel("combine", config, COMBINE_KEY)
        self._launch("combine", config)
        sel = handle.sparse_to_dense_map  # [src, T, dst]
        t = sel.shape[1]
        width = config.num_of_experts_per_rank * config.num_of_ranks_per_node
        out = torch.zeros(t, hidden.shape[1], dtype=torch.float32)
        out_probs = torch.zeros(t, width, dtype=torch.float32) if with_probs else None
        rows = self._gather(hidden)
        prob_rows = self._gather(probs) if with_probs else None
        for dst in range(self.world):
            # rank dst's received rows are ordered by source rank: ours start after lower ranks' tokens
            start = sum(int(sel[s, :, dst].sum()) for s in range(self.rank))
            mine = sel[self.rank, :, dst]
            n = int(mine.sum())
            out[mine] += rows[dst][start: start + n].float()
            if with_probs:
                out_probs[mine] += prob_rows[dst][start: start + n]
        return out.to(torch.bfloat16), out_probs

    def _gather(self, x):
        """Every rank's rows (padded to the longest), so each rank can pick what others send back to it."""
        n = torch.tensor([x.shape[0]], dtype=torch.int64)
        ns = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(ns, n, group=self.group)
        padded = torch.zeros(int(max(ns)), *x.shape[1:], dtype=x.dtype)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return out
