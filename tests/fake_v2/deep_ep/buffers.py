"""ElasticBuffer of the CPU stand-in (see the package docstring for what is kept from V2)."""

import functools
import math
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from . import runtime
from .utils.envs import get_nvlink_gbs


def weak_lru(maxsize=128, typed=False):  # deep_ep/utils/semantic.py: cache per (self, args), self held weakly
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
    """V2 returns an event to wait on only for a call made with async_with_compute_stream=True; waiting on the
    others is a caller's mistake (asserted, like v1's EventOverlap(None))."""

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self):
        assert self.event is not None, "waited on the event of a call made without async_with_compute_stream"


class EPHandle:
    """The fields of V2's EPHandle the tuner reads, plus the stand-in's routes (underscored)."""

    def __init__(self, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx, counts,
                 recv_src_metadata, routes):
        self.do_expand = False
        self.num_experts, self.expert_alignment = num_experts, expert_alignment
        self.num_max_tokens_per_rank, self.num_sms = num_max_tokens_per_rank, num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = recv_src_metadata.shape[0]
        self.num_recv_tokens_per_expert_list = counts
        self.psum_num_recv_tokens_per_expert = torch.tensor(counts, dtype=torch.int32).cumsum(0)
        self.recv_src_metadata = recv_src_metadata
        self._routes = routes


class _Routes:
    """Where this rank's tokens went and how received rows are ordered: a2a order is (source rank, token);
    handle order is a2a_order[perm]."""

    def __init__(self, group, me, topk_idx, num_experts, num_ranks, num_sms, max_tokens):
        epr = num_experts // num_ranks
        dst = torch.where(topk_idx >= 0, topk_idx // epr, torch.full_like(topk_idx, -1))
        in_rank = torch.stack([(dst == j).any(1) for j in range(num_ranks)], dim=1)
        self.group = group
        self.send_index = torch.cat([in_rank[:, j].nonzero().flatten() for j in range(num_ranks)])
        self.send_counts = in_rank.sum(0).tolist()
        self.recv_counts = runtime.exchange_counts(group, self.send_counts)
        gid = me * max_tokens + torch.arange(topk_idx.shape[0])
        self.src = self.forward(gid)  # global source ids, a2a order
        channels = max(1, num_sms // 2)
        key = (self.src % max_tokens) % channels * (num_ranks * max_tokens) + self.src
        self.perm = torch.argsort(key)

    def forward(self, rows):
        return runtime.move_rows(self.group, rows[self.send_index], self.send_counts, self.recv_counts)

    def to_handle_order(self, rows):
        return rows[self.perm]

    def backward(self, rows_in_handle_order, num_tokens):
        a2a = torch.empty_like(rows_in_handle_order)
        a2a[self.perm] = rows_in_handle_order
        back = runtime.move_rows(self.group, a2a, self.recv_counts, self.send_counts)
        out = torch.zeros(num_tokens, *rows_in_handle_order.shape[1:], dtype=torch.float32)
        out.index_add_(0, self.send_index, back.float())
        return out


class ElasticBuffer:
    def __init__(self, group, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3, num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300,
                 num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False):
        self.group = group
        self.rank_idx, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.num_max_tokens_per_rank, self.hidden = num_max_tokens_per_rank, hidden
        self.num_bytes = num_bytes or max(1, num_max_tokens_per_rank * hidden * 2 * self.num_ranks) + (2 << 20)
        self.num_allocated_qps = num_allocated_qps or 129
        self.explicitly_destroy = explicitly_destroy
        self.alive = True
        dist.barrier(group=group)  # elastic.py:364-367 ends with a barrier

    def destroy(self):
        assert self.explicitly_destroy
        self.alive = False

    def get_logical_domain_size(self):
        return 1, self.num_ranks

    def get_physical_domain_size(self):
        return 1, self.num_ranks

    @weak_lru(maxsize=None)
    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0,
                                sm_read_gbs: float = 200, sm_write_gbs: float = 50) -> int:
        """elastic.py:728-834, single node (no scale-out, no RDMA ranks)."""
        assert num_scaleout_topk == 0
        nvlink_gbs = nvlink_gbs or get_nvlink_gbs()
        r = self.num_ranks
        expected_topk = r * (1 - math.comb(num_experts - num_experts // r, num_topk) / math.comb(num_experts, num_topk))
        sm_read, sm_write = 1 / expected_topk, self.num_nvlink_ranks / r
        traffic = self.num_nvlink_ranks / r * (1 - 1 / self.num_nvlink_ranks)
        num_sms = runtime.device_sms()
        if traffic > 0:
            num_sms = max(nvlink_gbs / traffic * sm_read / sm_read_gbs, nvlink_gbs / traffic * sm_write / sm_write_gbs)
        num_sms = max(4, math.ceil(num_sms * 1.25))
        num_sms += num_sms % 2
        num_sms = num_sms if self.prefer_overlap_with_compute else max(num_sms, 64)
        return min(num_sms, runtime.device_sms())

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        return min(num_sms * 16 + 1, self.num_allocated_qps)

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None,
                 num_sms: int = 0, num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True, do_cpu_sync=None,
                 do_expand: bool = False, do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False):
        assert self.alive and not do_expand, "the stand-in implements non-expand mode only"
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else num_sms
        xs, sf = x if isinstance(x, tuple) else (x, None)
        _check_x(xs, sf, self.num_max_tokens_per_rank)
        if handle is not None:
            assert topk_idx is None
            assert num_experts in (None, handle.num_experts) and expert_alignment in (None, handle.expert_alignment)
            runtime.launch("cached_dispatch", num_sms)
            return self._cached(xs, sf, topk_weights, handle)
        if num_experts is None or num_experts % self.num_ranks:
            raise RuntimeError(f"Assertion exception (buffer.hpp:805): num_experts % num_ranks == 0 ({num_experts})")
        runtime.launch("dispatch", num_sms)
        routes = _Routes(self.group, self.rank_idx, topk_idx, num_experts, self.num_ranks, num_sms,
                         self.num_max_tokens_per_rank)
        recv_x = self._rows(routes, xs, sf, "dispatch_row")
        epr = num_experts // self.num_ranks
        got_idx = routes.to_handle_order(routes.forward(topk_idx))
        local = (got_idx >= self.rank_idx * epr) & (got_idx < (self.rank_idx + 1) * epr)
        recv_idx = torch.where(local, got_idx - self.rank_idx * epr, torch.full_like(got_idx, -1))
        routes.local = local
        recv_w = None if topk_weights is None else routes.to_handle_order(routes.forward(topk_weights))
        align = expert_alignment or 1
        counts = [-(-int((recv_idx == e).sum()) // align) * align for e in range(epr)]
        meta = torch.zeros(recv_idx.shape[0], num_topk + 2, dtype=torch.int32)
        meta[:, 0] = routes.to_handle_order(routes.src).to(torch.int32)
        if runtime.take_fault("duplicate_row") and meta.shape[0] > 1:
            # row and metadata agree with each other, but one token arrives twice and another never
            rows = recv_x if sf is None else recv_x[0]
            meta[-1], rows[-1] = meta[0], rows[0]
        h = EPHandle(num_experts, align, num_max_tokens_per_rank or self.num_max_tokens_per_rank, num_sms,
                     topk_idx.clone(), counts, meta, routes)
        return recv_x, recv_idx, recv_w, h, EventOverlap()

    def _rows(self, routes, xs, sf, fault):
        recv = routes.to_handle_order(routes.forward(xs))
        if runtime.take_fault(fault) and recv.shape[0] > 1:
            recv[0] = recv[1]  # a wrong row; the metadata still names the right token
        if sf is None:
            return recv
        return recv, routes.to_handle_order(routes.forward(sf))

    def _cached(self, xs, sf, topk_weights, handle):
        routes = handle._routes
        recv_x = self._rows(routes, xs, sf, "cached_row")
        recv_w = None if topk_weights is None else routes.to_handle_order(routes.forward(topk_weights))
        return recv_x, None, recv_w, handle, EventOverlap()

    def combine(self, x, handle: EPHandle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False):
        assert self.alive
        num_sms = handle.num_sms if num_sms == 0 else num_sms
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != handle.num_recv_tokens:
            raise RuntimeError(f"Assertion exception (buffer.hpp:1203): combine takes bf16 [{handle.num_recv_tokens}, "
                               f"hidden], got {x.dtype} {tuple(x.shape)}")
        runtime.launch("combine", num_sms)
        routes, t = handle._routes, handle.topk_idx.shape[0]
        out = routes.backward(x, t)
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                out += b.float()
        if runtime.take_fault("combine_row") and t > 0:
            out[0] *= 2
        combined_w = None
        if topk_weights is not None:
            combined_w = routes.backward(torch.where(routes.local, topk_weights.float(), 0.0), t)
        return out.to(torch.bfloat16), combined_w, EventOverlap("async" if async_with_compute_stream else None)


def _check_x(xs, sf, max_tokens):
    if sf is None and xs.dtype != torch.bfloat16:
        raise RuntimeError(f"x must be bf16 or an (fp8, sf) tuple, got {xs.dtype}")
    if sf is not None and (xs.dtype != torch.float8_e4m3fn or sf.dtype != torch.float32
                           or tuple(sf.shape) != (xs.shape[0], xs.shape[1] // 128)):
        raise RuntimeError(f"fp8 x needs float8_e4m3fn data and float32 sf [T, H/128], got {xs.dtype} {sf.dtype} "
                           f"{tuple(sf.shape)}")
    if (xs.shape[1] * xs.element_size()) % 16:
        raise RuntimeError("Assertion exception (buffer.hpp:754): hidden * element_size % 16 == 0")
    if xs.shape[0] > max_tokens:
        raise RuntimeError(f"Assertion exception (buffer.hpp:756): {xs.shape[0]} tokens > num_max_tokens_per_rank "
                           f"{max_tokens}")
