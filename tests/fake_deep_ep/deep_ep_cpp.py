"""CPU stand-in for DeepEP's compiled extension `deep_ep_cpp` (the module the real wheel's deep_ep imports).

Faithful where the config path is concerned, trivial where data moves:
- `Config` has the pybind signature and host asserts of csrc/config.hpp, and like the real class its fields
  cannot be read from Python (only the two size hints are bound). A Python subclass must call
  `Config.__init__`, as pybind11 enforces.
- `Buffer` (the C++ runtime) keeps the constructor and intranode dispatch/combine host asserts of
  csrc/deep_ep.cpp, including the NVL buffer size checks a too-small `num_nvl_bytes` trips and the
  num_sms/handle coupling. Asserts raise RuntimeError with EPException's message, as pybind11 translates it.
- Data movement is single-process: every token is "received" by the calling rank, once.

Line references: csrc/deep_ep.cpp and csrc/config.hpp at DeepEP tag v1.2.1 (9af0e0d). The real wheel we run
(tokenspeed-deepep 1.2.1.post20251110) is a little newer (topk_idx_t, enable_shrink, use_fabric in the
runtime constructor); the asserts transcribed here are unchanged in it as far as its buffer.py shows.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

# csrc/kernels/configs.cuh
NUM_MAX_NVL_PEERS = 8
NUM_MAX_RDMA_PEERS = 20
NUM_MAX_LOCAL_EXPERTS = 1024
NUM_BUFFER_ALIGNMENT_BYTES = 128
INT_MAX = 2**31 - 1
# sizeof(internode::SourceMeta): two ints. Counted by the size hint in an NVSHMEM build (the usual wheel).
SOURCE_META_BYTES = 8
INT4_BYTES = 16

topk_idx_t = torch.int64


def _host_assert(cond: bool, line: int, text: str, file: str = "csrc/deep_ep.cpp") -> None:
    """EP_HOST_ASSERT: throws EPException, which pybind11 turns into RuntimeError (kernels/exception.cuh)."""
    if not cond:
        raise RuntimeError(f"Failed: Assertion error {file}:{line} '{text}'")


@dataclass(frozen=True)
class _Fields:
    num_sms: int
    nvl_send: int
    nvl_recv: int
    rdma_send: int
    rdma_recv: int


# The C++ struct's storage. Kept off the instance so that, as with pybind11, Python code cannot read it.
_CONFIG_FIELDS: "weakref.WeakKeyDictionary[Config, _Fields]" = weakref.WeakKeyDictionary()


class _PybindMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        # pybind11_meta_call: a Python subclass that skips the base __init__ leaves no C++ object.
        if obj not in _CONFIG_FIELDS:
            raise TypeError(f"{cls.__name__}.__init__() must be called when overriding __init__")
        return obj


def _int_arg(v: Any) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError("__init__(): incompatible constructor arguments") from None


class Config(metaclass=_PybindMeta):
    """deep_ep_cpp.Config (pybind: deep_ep.cpp L1345-1351; struct: config.hpp L18-98)."""

    __slots__ = ("__weakref__",)

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        num_sms = _int_arg(num_sms)
        nvl_send, nvl_recv = _int_arg(num_max_nvl_chunked_send_tokens), _int_arg(num_max_nvl_chunked_recv_tokens)
        rdma_send, rdma_recv = _int_arg(num_max_rdma_chunked_send_tokens), _int_arg(num_max_rdma_chunked_recv_tokens)
        f = "csrc/config.hpp"
        _host_assert(num_sms >= 0, 33, "num_sms >= 0", f)
        _host_assert(nvl_send > 0 and nvl_recv > 0, 34,
                     "num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0", f)
        _host_assert(nvl_send < nvl_recv, 35, "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens", f)
        _host_assert(rdma_send > 0 and rdma_recv > 0, 36,
                     "num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0", f)
        rdma_recv = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send  # L39: ceil up to the send chunk
        _host_assert(rdma_send < rdma_recv, 40, "num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens", f)
        _host_assert(rdma_send <= rdma_recv // 2, 42,
                     "num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2", f)
        _CONFIG_FIELDS[self] = _Fields(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """config.hpp L45-67: a worst-case bound (top-k and scales up to 128 each)."""
        c = _fields(self)
        k_max_topk = k_max_scales = 128
        _host_assert(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0, 50,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0", "csrc/config.hpp")
        _host_assert(num_ranks <= NUM_MAX_NVL_PEERS or c.num_sms % 2 == 0, 51,
                     "num_ranks <= NUM_MAX_NVL_PEERS or num_sms % 2 == 0", "csrc/config.hpp")
        rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        slots = (c.num_sms // 2) * nvl_ranks
        n = 0
        n += slots * (2 * rdma_ranks + 3) * 4
        n += slots * c.nvl_recv * hidden_bytes
        n += slots * c.nvl_recv * SOURCE_META_BYTES
        n += slots * c.nvl_recv * k_max_topk * 8
        n += slots * c.nvl_recv * k_max_topk * 4
        n += slots * c.nvl_recv * k_max_scales * 4
        return (n + 127) // 128 * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """config.hpp L69-97 (NVSHMEM build): 0 intranode."""
        c = _fields(self)
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        k_max_topk = k_max_scales = 128
        _host_assert(num_ranks % NUM_MAX_NVL_PEERS == 0, 79, "num_ranks % NUM_MAX_NVL_PEERS == 0", "csrc/config.hpp")
        _host_assert(c.num_sms % 2 == 0, 80, "num_sms % 2 == 0", "csrc/config.hpp")
        slots = (c.num_sms // 2) * (num_ranks // NUM_MAX_NVL_PEERS)
        per_token = (hidden_bytes + SOURCE_META_BYTES + k_max_topk * 8 + k_max_topk * 4 + k_max_scales * 4
                     + INT4_BYTES) * 2
        n = slots * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4 + slots * c.rdma_recv * per_token + 1048576
        return (n + 127) // 128 * 128


def _fields(config: Any) -> _Fields:
    """What the C++ side reads from a `const Config&` argument; anything else is a pybind type error."""
    fields = _CONFIG_FIELDS.get(config) if isinstance(config, Config) else None
    if fields is None:
        raise TypeError(f"incompatible function arguments: expected deep_ep_cpp.Config, got {type(config).__name__}")
    return fields


class EventHandle:
    """deep_ep_cpp.EventHandle: on CPU there is nothing to wait for."""

    def __init__(self) -> None:
        pass

    def current_stream_wait(self) -> None:
        pass


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                   num_experts: int) -> int:
    raise NotImplementedError("fake deep_ep_cpp: low-latency mode is not modelled")


def is_sm90_compiled() -> bool:
    return False


class Buffer:
    """The C++ runtime (deep_ep.cpp Buffer), intranode only."""

    def __init__(self, rank: int, num_ranks: int, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                 explicitly_destroy: bool, enable_shrink: bool = False, use_fabric: bool = False) -> None:
        # deep_ep.cpp L27-32 (constructor common checks)
        _host_assert(num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (num_nvl_bytes <= INT_MAX or num_rdma_bytes == 0),
                     27, "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (num_nvl_bytes <= "
                         "std::numeric_limits<int>::max() or num_rdma_bytes == 0)")
        _host_assert(num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (low_latency_mode or num_rdma_bytes <= INT_MAX),
                     28, "num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (low_latency_mode or "
                         "num_rdma_bytes <= std::numeric_limits<int>::max())")
        _host_assert(0 <= rank < num_ranks and (num_ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS or low_latency_mode),
                     29, "0 <= rank and rank < num_ranks and (num_ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS "
                         "or low_latency_mode)")
        _host_assert(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0, 30,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        if num_rdma_bytes > 0:
            _host_assert(num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode, 32,
                         "num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode")
        self.rank, self.num_ranks = rank, num_ranks
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        self.rdma_rank, self.nvl_rank = rank // NUM_MAX_NVL_PEERS, rank % NUM_MAX_NVL_PEERS
        self.num_rdma_ranks = max(1, num_ranks // NUM_MAX_NVL_PEERS)
        self.available = False
        self.destroyed = False

    # Setup and bookkeeping (deep_ep.cpp L97-125, destroy L143, sync L186)
    def is_available(self) -> bool:
        return self.available

    def get_num_rdma_ranks(self) -> int:
        return self.num_rdma_ranks

    def get_rdma_rank(self) -> int:
        return self.rdma_rank

    def get_root_rdma_rank(self, global_: bool) -> int:
        return self.nvl_rank if global_ else 0

    def get_local_device_id(self) -> int:
        return 0

    def get_local_ipc_handle(self) -> bytes:
        return bytes(64)

    def get_local_nvshmem_unique_id(self) -> bytes:
        return bytes(128)

    def sync(self, device_ids: list, ipc_handles: list, root_unique_id: Optional[bytes]) -> None:
        _host_assert(not self.available, 188, "not is_available()")
        _host_assert(len(device_ids) == self.num_ranks, 192, "num_ranks == device_ids.size()")
        self.available = True

    def destroy(self) -> None:
        _host_assert(not self.destroyed, 144, "not destroyed")
        self.available, self.destroyed = False, True

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventHandle],
                            async_: bool, allocate_on_comm_stream: bool):
        """deep_ep.cpp L243-301: per-rank and per-expert token counts from top-k expert indices."""
        _host_assert(topk_idx.dim() == 2, 245, "topk_idx.dim() == 2")
        _host_assert(topk_idx.is_contiguous(), 246, "topk_idx.is_contiguous()")
        _host_assert(num_experts > 0, 247, "num_experts > 0")
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_, 253, "previous_event.has_value() and async")
        if topk_idx.dtype != torch.int64:  # data_ptr<int64_t>() in the real code
            raise RuntimeError(f"expected scalar type Long but found {topk_idx.dtype}")
        num_tokens, r = topk_idx.size(0), self.num_ranks
        valid = topk_idx >= 0
        experts = topk_idx.clamp(min=0)
        num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32, device=topk_idx.device)
        num_tokens_per_expert.index_add_(0, experts[valid], torch.ones_like(experts[valid], dtype=torch.int32))
        rank_of = experts // (num_experts // r)
        is_token_in_rank = torch.zeros(num_tokens, r, dtype=torch.bool, device=topk_idx.device)
        rows = torch.arange(num_tokens, device=topk_idx.device).unsqueeze(1).expand_as(rank_of)
        is_token_in_rank[rows[valid], rank_of[valid]] = True
        num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
        num_tokens_per_rdma_rank = None  # only when internode (L268)
        event = EventHandle() if async_ else None
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event

    def intranode_dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                           num_tokens_per_expert, cached_num_recv_tokens, cached_rank_prefix_matrix,
                           cached_channel_prefix_matrix, expert_alignment, num_worst_tokens, config,
                           previous_event, async_, allocate_on_comm_stream):
        """deep_ep.cpp L303-540, host side. Returns the same 11 values."""
        cfg = _fields(config)
        r = self.num_ranks
        cached_mode = cached_rank_prefix_matrix is not None
        _host_assert(cfg.num_sms % 2 == 0, 315, "config.num_sms % 2 == 0")
        num_channels = cfg.num_sms // 2
        if cached_mode:
            _host_assert(cached_channel_prefix_matrix is not None, 319, "cached_channel_prefix_matrix.has_value()")
        else:
            _host_assert(num_tokens_per_rank is not None, 321, "num_tokens_per_rank.has_value()")
            _host_assert(num_tokens_per_expert is not None, 322, "num_tokens_per_expert.has_value()")
        _host_assert(is_token_in_rank.dtype == torch.bool, 326, "is_token_in_rank.scalar_type() == torch::kBool")
        _host_assert(x.dim() == 2 and x.is_contiguous(), 336, "x.dim() == 2 and x.is_contiguous()")
        _host_assert((x.size(1) * x.element_size()) % INT4_BYTES == 0, 337,
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        _host_assert(is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous(), 338,
                     "is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous()")
        _host_assert(is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == r, 339,
                     "is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == num_ranks")
        if cached_mode:
            _host_assert(tuple(cached_rank_prefix_matrix.shape) == (r, r), 342,
                         "cached_rank_prefix_matrix->size(0) == num_ranks and cached_rank_prefix_matrix->size(1) == num_ranks")
            # The handle was made with some num_sms; a cached dispatch must use the same one.
            _host_assert(cached_channel_prefix_matrix.size(0) == r and cached_channel_prefix_matrix.size(1) == num_channels,
                         344, "cached_channel_prefix_matrix->size(0) == num_ranks and "
                              "cached_channel_prefix_matrix->size(1) == num_channels")
        else:
            _host_assert(num_tokens_per_expert.dim() == 1, 346, "num_tokens_per_expert->dim() == 1")
            _host_assert(num_tokens_per_expert.size(0) % r == 0, 347, "num_tokens_per_expert->size(0) % num_ranks == 0")
            _host_assert(num_tokens_per_expert.size(0) // r <= NUM_MAX_LOCAL_EXPERTS, 348,
                         "num_tokens_per_expert->size(0) / num_ranks <= NUM_MAX_LOCAL_EXPERTS")
            _host_assert(num_tokens_per_rank.dim() == 1 and num_tokens_per_rank.size(0) == r, 350,
                         "num_tokens_per_rank->size(0) == num_ranks")
        num_tokens, hidden = x.size(0), x.size(1)
        num_experts = 0 if cached_mode else num_tokens_per_expert.size(0)
        num_local_experts = num_experts // r

        num_topk = 0
        _host_assert((topk_idx is None) == (topk_weights is None), 360, "topk_idx.has_value() == topk_weights.has_value()")
        if topk_idx is not None:
            num_topk = topk_idx.size(1)
            _host_assert(num_experts > 0, 363, "num_experts > 0")
            _host_assert(num_tokens == topk_idx.size(0) and num_tokens == topk_weights.size(0), 366,
                         "num_tokens == topk_idx->size(0) and num_tokens == topk_weights->size(0)")
            _host_assert(num_topk == topk_weights.size(1), 367, "num_topk == topk_weights->size(1)")
            _host_assert(topk_weights.dtype == torch.float32, 368, "topk_weights->scalar_type() == torch::kFloat32")

        num_scales = 0
        if x_scales is not None:
            _host_assert(x.element_size() == 1, 377, "x.element_size() == 1")
            _host_assert(x_scales.dim() == 2, 379, "x_scales->dim() == 2")
            _host_assert(x_scales.size(0) == num_tokens, 380, "x_scales->size(0) == num_tokens")
            num_scales = x_scales.size(1)
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_, 391, "previous_event.has_value() and async")

        if cached_mode:
            num_recv_tokens = cached_num_recv_tokens
            rank_prefix_matrix, channel_prefix_matrix = cached_rank_prefix_matrix, cached_channel_prefix_matrix
        else:
            rank_prefix_matrix = torch.zeros(r, r, dtype=torch.int32, device=x.device)
            channel_prefix_matrix = torch.zeros(r, num_channels, dtype=torch.int32, device=x.device)
            _host_assert(r * (r + num_local_experts) * 4 <= self.num_nvl_bytes, 432,
                         "num_ranks * (num_ranks + num_local_experts) * sizeof(int) <= num_nvl_bytes")
            if num_worst_tokens > 0:
                _host_assert(topk_idx is not None, 446, "topk_idx.has_value()")
                num_recv_tokens = num_worst_tokens
            else:
                num_recv_tokens = num_tokens  # single process: this rank receives its own tokens

        elem = x.element_size()
        slots = num_channels * r
        needed = (r * r * 4 + slots * 4 + slots * 4 + slots * 4 * 2
                  + slots * cfg.nvl_recv * hidden * elem + slots * cfg.nvl_recv * 4
                  + slots * cfg.nvl_recv * num_topk * 8 + slots * cfg.nvl_recv * num_topk * 4
                  + slots * cfg.nvl_recv * 4 * num_scales)
        _host_assert(needed <= self.num_nvl_bytes, 496, "num_ranks * num_ranks * sizeof(int) + ... <= num_nvl_bytes")

        # Data: this rank "receives" its own tokens (padded to num_worst_tokens when given).
        def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            out = t.new_zeros((num_recv_tokens,) + tuple(t.shape[1:]))
            n = min(num_recv_tokens, t.size(0))
            out[:n] = t[:n]
            return out

        recv_x, recv_x_scales = take(x), take(x_scales)
        recv_topk_idx, recv_topk_weights = take(topk_idx), take(topk_weights)
        num_recv_tokens_per_expert_list: list[int] = []
        if not cached_mode and num_worst_tokens == 0 and topk_idx is not None and num_local_experts > 0:
            lo = self.rank * num_local_experts
            counts = torch.bincount((topk_idx[(topk_idx >= lo) & (topk_idx < lo + num_local_experts)] - lo).flatten(),
                                    minlength=num_local_experts)
            num_recv_tokens_per_expert_list = [
                (int(c) + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]
        recv_channel_prefix_matrix = torch.zeros(r, num_channels, dtype=torch.int32, device=x.device)
        recv_src_idx = torch.arange(num_recv_tokens, dtype=torch.int32, device=x.device)
        send_head = torch.zeros(num_tokens, r, dtype=torch.int32, device=x.device)
        event = EventHandle() if async_ else None
        return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
                rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, send_head, event)

    def intranode_combine(self, x, topk_weights, bias_0, bias_1, src_idx, rank_prefix_matrix, channel_prefix_matrix,
                          send_head, config, previous_event, async_, allocate_on_comm_stream):
        """deep_ep.cpp L542-640, host side. Returns (recv_x, recv_topk_weights, event)."""
        cfg = _fields(config)
        r = self.num_ranks
        _host_assert(x.dim() == 2 and x.is_contiguous(), 547, "x.dim() == 2 and x.is_contiguous()")
        _host_assert(src_idx.dim() == 1 and src_idx.dtype == torch.int32, 548,
                     "src_idx.dim() == 1 and src_idx.is_contiguous() and src_idx.scalar_type() == torch::kInt32")
        _host_assert(send_head.dim() == 2 and send_head.dtype == torch.int32, 549,
                     "send_head.dim() == 2 and send_head.is_contiguous() and send_head.scalar_type() == torch::kInt32")
        _host_assert(cfg.num_sms % 2 == 0, 554, "config.num_sms % 2 == 0")
        num_channels = cfg.num_sms // 2
        num_tokens, hidden = x.size(0), x.size(1)
        num_recv_tokens = send_head.size(0)
        _host_assert(src_idx.size(0) == num_tokens, 559, "src_idx.size(0) == num_tokens")
        _host_assert(send_head.size(1) == r, 560, "send_head.size(1) == num_ranks")
        _host_assert(tuple(rank_prefix_matrix.shape) == (r, r), 561,
                     "rank_prefix_matrix.size(0) == num_ranks and rank_prefix_matrix.size(1) == num_ranks")
        # The handle's channel count must match this config's num_sms / 2.
        _host_assert(channel_prefix_matrix.size(0) == r and channel_prefix_matrix.size(1) == num_channels, 562,
                     "channel_prefix_matrix.size(0) == num_ranks and channel_prefix_matrix.size(1) == num_channels")
        _host_assert((hidden * x.element_size()) % INT4_BYTES == 0, 563, "(hidden * x.element_size()) % sizeof(int4) == 0")
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_, 569, "previous_event.has_value() and async")
        num_topk = 0
        if topk_weights is not None:
            _host_assert(topk_weights.dim() == 2 and topk_weights.size(0) == num_tokens, 586,
                         "topk_weights->size(0) == num_tokens")
            _host_assert(topk_weights.dtype == torch.float32, 587, "topk_weights->scalar_type() == torch::kFloat32")
            num_topk = topk_weights.size(1)
        _host_assert(num_channels * r * 4 * 2 <= self.num_nvl_bytes, 595,
                     "num_channels * num_ranks * sizeof(int) * 2 <= num_nvl_bytes")
        for i, bias in enumerate((bias_0, bias_1)):
            if bias is not None:
                _host_assert(tuple(bias.shape) == (num_recv_tokens, hidden), 608,
                             "bias.size(0) == num_recv_tokens and bias.size(1) == hidden")
        slots = num_channels * r
        needed = (slots * 4 * 2 + slots * cfg.nvl_recv * hidden * x.element_size() + slots * cfg.nvl_recv * 4
                  + slots * cfg.nvl_recv * num_topk * 4)
        _host_assert(needed <= self.num_nvl_bytes, 614, "num_channels * num_ranks * sizeof(int) * 2 + ... <= num_nvl_bytes")

        recv_x = x[:num_recv_tokens].clone()
        for bias in (bias_0, bias_1):
            if bias is not None:
                recv_x = recv_x + bias
        recv_topk_weights = topk_weights[:num_recv_tokens].clone() if topk_weights is not None else None
        return recv_x, recv_topk_weights, (EventHandle() if async_ else None)
