"""CPU fake of deep_ep V2 (deepseek-ai/DeepEP main @dd758caf, deep_ep/buffers/elastic.py), for the runtime tests of
deepep_tune.runtime.elastic (tests/test_next_gen_runtime.py); not the tuner's fake (tests/fake_v2).

Signatures of ElasticBuffer.__init__/dispatch/combine/get_theoretical_num_sms/get_theoretical_num_qps and the
num_sms resolution rules (elastic.py L926-929, L999-1015, L1086) are kept; communication is identity on one rank.
`ElasticBuffer.runtime.calls` records the (op, num_sms, num_qps) the "kernel" was really launched with: the ground
truth an audit must reproduce. The real __init__ also exports Buffer (legacy), EPHandle, EventOverlap, Config."""
import functools
import math
import weakref
from typing import Optional

import torch

FAKE_NUM_DEVICE_SMS = 132          # H200
FAKE_NVLINK_GBS = 450.0 * 0.9      # what get_nvlink_gbs() would give on H200 NVLink (x0.9)


def weak_lru(maxsize=128, typed=False):            # deep_ep/utils/semantic.py
    def wrapper(func):
        @functools.lru_cache(maxsize, typed)
        def _func(_self, *args, **kwargs):
            return func(_self(), *args, **kwargs)

        @functools.wraps(func)
        def inner(self, *args, **kwargs):
            return _func(weakref.ref(self), *args, **kwargs)
        return inner
    return wrapper


class EventOverlap:
    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self):
        pass


class EPHandle:
    def __init__(self, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx,
                 num_recv_tokens, num_recv_tokens_per_expert_list):
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = torch.tensor([num_recv_tokens], dtype=torch.int32)
        self.psum_num_recv_tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list,
                                                            dtype=torch.int32).cumsum(0)


class _Runtime:
    def __init__(self):
        self.calls = []


class ElasticBuffer:
    def __init__(self, group, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3, num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300,
                 num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False):
        self.group = group
        self.rank_idx, self.num_ranks = group.rank(), group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        if num_bytes is None:
            num_bytes = ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk,
                                                           use_fp8_dispatch, allow_hybrid_mode,
                                                           allow_multiple_reduction)
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_allocated_qps = num_allocated_qps or (129 if allow_hybrid_mode else 17)
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.runtime = _Runtime()

    def destroy(self):
        self.runtime = None

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        raw = group.size() * max(num_max_tokens_per_rank, 1) * max(hidden, 1) * 2 * max(num_topk, 1)
        return (raw + (2 << 20) - 1) // (2 << 20) * (2 << 20)

    @staticmethod
    def capture():
        return None

    @weak_lru(maxsize=None)
    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0,
                                sm_read_gbs: float = 200, sm_write_gbs: float = 50) -> int:
        # Same arithmetic as elastic.py L729-834 for the single-node (num_scaleout_ranks == 1, no RDMA) case.
        assert num_scaleout_topk == 0
        nvlink_gbs = nvlink_gbs or FAKE_NVLINK_GBS
        expected_topk = self.num_ranks * (1 - math.comb(num_experts - num_experts // self.num_ranks, num_topk)
                                          / math.comb(num_experts, num_topk))
        sm_read = 1 / expected_topk
        sm_write = self.num_nvlink_ranks / self.num_ranks
        traffic = self.num_nvlink_ranks / self.num_ranks * (1 - 1 / self.num_nvlink_ranks)
        num_sms = FAKE_NUM_DEVICE_SMS
        if traffic > 0:
            num_sms = max(nvlink_gbs / traffic * sm_read / sm_read_gbs, nvlink_gbs / traffic * sm_write / sm_write_gbs)
        num_sms = max(4, math.ceil(num_sms * 1.25))
        num_sms += num_sms % 2
        num_sms = num_sms if self.prefer_overlap_with_compute else max(num_sms, 64)
        return min(num_sms, FAKE_NUM_DEVICE_SMS)

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        num_qps = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9)
        return min(num_qps, self.num_allocated_qps)

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None,
                 num_sms: int = 0, num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True, do_cpu_sync=None,
                 do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False):
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else num_sms   # L928
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps                 # L929
        assert 0 < num_sms <= FAKE_NUM_DEVICE_SMS
        if handle is not None:
            assert topk_idx is None
            topk_idx = handle.topk_idx
            num_experts = num_experts if num_experts is not None else handle.num_experts
        self.runtime.calls.append(("dispatch", num_sms, num_qps))
        recv_x = x
        if handle is None:
            counts = [int((topk_idx == e).sum()) for e in range(num_experts // self.num_ranks)]
            handle = EPHandle(do_expand, num_experts, expert_alignment or 1,
                              num_max_tokens_per_rank or self.num_max_tokens_per_rank, num_sms,
                              topk_idx.clone(), x[0].shape[0] if isinstance(x, tuple) else x.shape[0], counts)
        return recv_x, topk_idx, topk_weights, handle, EventOverlap()

    def combine(self, x, handle: EPHandle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False):
        num_sms = handle.num_sms if num_sms == 0 else num_sms                                        # L1086
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        self.runtime.calls.append(("combine", num_sms, num_qps))
        return x, topk_weights, EventOverlap()


__version__ = "2.1.0"
