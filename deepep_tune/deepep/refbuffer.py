"""A CPU stand-in for deep_ep.Buffer and deep_ep.Config (DeepEP v1 intranode, normal mode) over
torch.distributed (gloo). Same signatures and return tuples as deep_ep/buffer.py v1.2.1, so one harness drives
either; it moves real tokens between ranks, so it defines what a correct dispatch/combine is.

Semantics kept from DeepEP:
- dispatch receives rows ordered by source rank, then token index; recv_topk_idx holds the local expert index or
  -1, recv_topk_weights the weight or 0 where the expert lives elsewhere; num_recv_tokens_per_expert_list is a
  Python list aligned up to expert_alignment, summed from every rank's num_tokens_per_expert argument.
- cached dispatch (handle=...) takes no top-k and returns None for top-k, the list and the handle.
- combine sums the copies of each token (no weights), in float32, then casts to bf16; bf16 only.
- a handle is tied to num_sms: cached dispatch and combine reject a config with another num_sms.
- Config validity is space.config_error, buffer size is space.nvl_bytes (the host asserts of deep_ep.cpp).
- an event returned without async_finish cannot be waited on (DeepEP returns EventOverlap(None)).
Every rank must make the same calls in the same order: dispatch and combine are collectives here, as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..knobs import Knobs
from .buffer import nvl_bytes, nvl_size_hint
from .config import (
    DEEPEP_DEFAULT_NUM_SMS,
    DEEPEP_DEFAULTS,
    PYBIND_DEFAULTS,
    ConfigArgs,
    TuneConfig,
)
from .workload import FP8_BLOCK, Workload

topk_idx_t = torch.int64  # deep_ep.topk_idx_t in a default build

XType = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class ReferenceConfig:
    """deep_ep.Config(num_sms, nvl_chunk, nvl_buffer, rdma_chunk, rdma_buffer): rejects what DeepEP rejects.
    Unlike the pybind class its fields are readable; harness code must not rely on that."""

    def __init__(self, num_sms: int = PYBIND_DEFAULTS[0], num_max_nvl_chunked_send_tokens: int = PYBIND_DEFAULTS[1],
                 num_max_nvl_chunked_recv_tokens: int = PYBIND_DEFAULTS[2],
                 num_max_rdma_chunked_send_tokens: int = PYBIND_DEFAULTS[3],
                 num_max_rdma_chunked_recv_tokens: int = PYBIND_DEFAULTS[4]) -> None:
        args = (num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
                num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens)
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise TypeError(f"Config takes ints, got {args}")  # pybind rejects non-ints the same way
        self.args = ConfigArgs(*args)
        err = self.args.error()
        if err:
            raise RuntimeError(f"Failed: Assertion error (reference Config): {err}")
        self.num_sms, self.nvl_chunk, self.nvl_buffer, self.rdma_chunk, self.rdma_buffer = args

    @property
    def tune_config(self) -> Knobs:
        return self.args.tuned()

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return nvl_size_hint(self.tune_config, hidden_bytes, num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        del hidden_bytes
        if num_ranks <= 8:
            return 0
        raise NotImplementedError("the reference buffer is intranode only (<= 8 ranks)")

    def __repr__(self) -> str:
        return (f"ReferenceConfig({self.num_sms}, {self.nvl_chunk}, {self.nvl_buffer}, {self.rdma_chunk}, "
                f"{self.rdma_buffer})")


class ReferenceEvent:
    """deep_ep.EventOverlap: the reference finishes every call before returning, so waiting is a no-op; but like
    DeepEP, only an event from an async_finish call (or capture()) holds an event to wait on."""

    def __init__(self, valid: bool) -> None:
        self.event: Optional[bool] = True if valid else None

    def current_stream_wait(self) -> None:
        assert self.event is not None  # DeepEP asserts the same: no event without async_finish

    def __enter__(self) -> "ReferenceEvent":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.event is not None:
            self.current_stream_wait()


@dataclass(frozen=True)
class ReferenceHandle:
    """What DeepEP's intranode handle encodes: which ranks each of this rank's tokens went to, how many rows came
    from each rank and which source token each received row is, and the num_sms (channels) it was made with."""

    num_sms: int
    is_token_in_rank: torch.Tensor  # [T, R] bool: this rank's tokens and where they went
    send_counts: tuple[int, ...]  # rows this rank sent to each rank
    recv_counts: tuple[int, ...]  # rows this rank received from each rank
    recv_src_idx: torch.Tensor  # [num_recv] int64: token index at its source rank
    num_recv_rows: int  # rows of recv_x (num_worst_tokens when that padded the output)


def _check_stream_args(previous_event: Any, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    # deep_ep.cpp: allocate_on_comm_stream needs previous_event and async (EP_HOST_ASSERT -> RuntimeError).
    if allocate_on_comm_stream and not (previous_event is not None and async_finish):
        raise RuntimeError("Failed: Assertion error: allocate_on_comm_stream needs previous_event and async_finish")


def _config_fields(config: Any) -> ReferenceConfig:
    if not isinstance(config, ReferenceConfig):
        raise TypeError(f"the reference buffer needs a ReferenceConfig, got {type(config).__name__}")
    return config


class ReferenceBuffer:
    """deep_ep.Buffer for intranode normal mode on CPU ranks of a torch.distributed group."""

    num_sms: int = DEEPEP_DEFAULT_NUM_SMS

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False, use_fabric: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None) -> None:
        del num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, enable_shrink
        if group is None:
            raise ValueError("the reference buffer needs a torch.distributed group (mpi4py comm is not supported)")
        if comm is not None:
            raise ValueError("pass group or comm, not both")
        if low_latency_mode:
            raise NotImplementedError("the reference buffer implements normal (high-throughput) mode only")
        if num_nvl_bytes % 128:
            raise RuntimeError(f"Failed: Assertion error: num_nvl_bytes ({num_nvl_bytes}) % 128 == 0")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        if self.group_size not in DEEPEP_DEFAULTS["dispatch"]:
            raise RuntimeError(f"DeepEP's intranode kernels run on 2, 4 or 8 ranks, not {self.group_size}")
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._alive = True
        self._ex = _Exchange(group, self.group_size)

    # --- the static part of deep_ep.Buffer ---------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        ReferenceBuffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> ReferenceEvent:
        return ReferenceEvent(valid=True)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> ReferenceConfig:
        return ReferenceBuffer._default_config("dispatch", num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> ReferenceConfig:
        return ReferenceBuffer._default_config("combine", num_ranks)

    @staticmethod
    def _default_config(op: str, num_ranks: int) -> ReferenceConfig:
        assert num_ranks in DEEPEP_DEFAULTS[op], f"Unsupported number of EP ranks: {num_ranks}"
        chunk, buf = DEEPEP_DEFAULTS[op][num_ranks]
        return ReferenceConfig(*ConfigArgs.of(TuneConfig(ReferenceBuffer.num_sms, chunk, buf)).as_tuple())

    def destroy(self) -> None:
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self._alive = False

    # --- layout --------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False
                            ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, ReferenceEvent]:
        self._check_alive()
        _check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if topk_idx.dim() != 2 or topk_idx.dtype != topk_idx_t:
            raise RuntimeError(f"topk_idx must be [num_tokens, num_topk] {topk_idx_t}, got {tuple(topk_idx.shape)} "
                               f"{topk_idx.dtype}")
        r = self.group_size
        if num_experts <= 0 or num_experts % r:
            raise RuntimeError(f"Failed: Assertion error: num_experts ({num_experts}) % num_ranks ({r}) == 0")
        per_rank = num_experts // r
        valid = topk_idx >= 0
        rank_of = torch.where(valid, topk_idx // per_rank, torch.full_like(topk_idx, -1))
        is_token_in_rank = torch.stack([(rank_of == j).any(1) for j in range(r)], dim=1)
        num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
        num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, ReferenceEvent(async_finish)

    # --- dispatch ------------------------------------------------------------------------------------------
    def dispatch(self, x: XType, handle: Optional[ReferenceHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[ReferenceConfig] = None,
                 previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False
                 ) -> tuple[XType, Optional[torch.Tensor], Optional[torch.Tensor], Optional[list[int]],
                            Optional[ReferenceHandle], ReferenceEvent]:
        self._check_alive()
        del num_tokens_per_rdma_rank  # intranode: always None
        cfg = _config_fields(self.get_dispatch_config(self.group_size) if config is None else config)
        _check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        xs, scales = x if isinstance(x, tuple) else (x, None)
        _check_x(xs, scales)
        if expert_alignment < 1:
            raise RuntimeError(f"expert_alignment must be >= 1, got {expert_alignment}")
        if handle is not None:
            assert topk_idx is None and topk_weights is None  # DeepEP's own Python assert
            _check_handle(handle, cfg, xs.shape[0])  # before the size check, as in deep_ep.cpp
        num_topk = 0 if handle is not None or topk_idx is None else topk_idx.shape[1]
        self._check_size("dispatch", cfg, xs, scales, num_topk)
        event = ReferenceEvent(async_finish)
        if handle is not None:
            return _cached_dispatch(self._ex, xs, scales, handle), None, None, None, None, event
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        if tuple(is_token_in_rank.shape) != (xs.shape[0], self.group_size) or \
                num_tokens_per_expert.numel() % self.group_size:
            raise RuntimeError("layout tensors do not match x and the rank count")
        if (topk_idx is None) != (topk_weights is None):
            raise RuntimeError("pass both topk_idx and topk_weights, or neither")
        if num_worst_tokens > 0 and topk_idx is None:
            raise RuntimeError("num_worst_tokens needs top-k (DeepEP: intranode only, with top-k)")
        return (*_fresh_dispatch(self._ex, self.rank, cfg, xs, scales, is_token_in_rank, num_tokens_per_expert,
                                 topk_idx, topk_weights, expert_alignment, num_worst_tokens), event)

    # --- combine -------------------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: ReferenceHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[ReferenceConfig] = None, previous_event: Any = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], ReferenceEvent]:
        self._check_alive()
        cfg = _config_fields(self.get_combine_config(self.group_size) if config is None else config)
        _check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
            raise RuntimeError(f"combine takes a contiguous 2-D bf16 x (DeepEP: BF16 only), got {x.dtype}")
        _check_handle(handle, cfg, None)
        if x.shape[0] != handle.num_recv_rows:
            raise RuntimeError(f"combine x has {x.shape[0]} rows, the handle received {handle.num_recv_rows}")
        num_topk = 0 if topk_weights is None else topk_weights.shape[1]
        self._check_size("combine", cfg, x, None, num_topk)
        num_real = sum(handle.recv_counts)
        t = handle.is_token_in_rank.shape[0]
        # Rows travel back along the dispatch's routes: send what I received, receive what I sent.
        back_src = self._ex.move_rows(handle.recv_src_idx[:num_real], handle.recv_counts, handle.send_counts)
        back_x = self._ex.move_rows(x[:num_real], handle.recv_counts, handle.send_counts)
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, back_src, back_x.float())
        for b in _biases(bias):
            if b.dtype != torch.bfloat16 or tuple(b.shape) != (t, x.shape[1]):
                raise RuntimeError(f"bias must be bf16 [{t}, {x.shape[1]}], got {b.dtype} {tuple(b.shape)}")
            out += b.float()
        combined_w = None
        if topk_weights is not None:
            back_w = self._ex.move_rows(topk_weights[:num_real].float(), handle.recv_counts, handle.send_counts)
            combined_w = torch.zeros(t, topk_weights.shape[1], dtype=torch.float32, device=x.device)
            combined_w.index_add_(0, back_src, back_w)
        return out.to(torch.bfloat16), combined_w, ReferenceEvent(async_finish)

    # --- helpers -------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("the buffer was destroyed")

    def _check_size(self, op: str, cfg: ReferenceConfig, xs: torch.Tensor, scales: Optional[torch.Tensor],
                    num_topk: int) -> None:
        # nvl_bytes reads tokens, hidden, top-k and dtype; num_experts does not enter the host asserts
        w = Workload(num_tokens=xs.shape[0], hidden=xs.shape[1], num_topk=num_topk,
                     num_experts=self.group_size, dispatch_dtype="fp8" if scales is not None else "bf16")
        need = nvl_bytes(op, cfg.tune_config, self.group_size, w)
        if need > self.num_nvl_bytes:
            raise RuntimeError(f"Failed: Assertion error: {op} at {cfg} needs {need} NVL bytes, the buffer has "
                               f"{self.num_nvl_bytes}")


# --- argument checks (the host asserts of deep_ep.cpp) --------------------------------------------------------
def _check_x(xs: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
    if xs.dim() != 2 or not xs.is_contiguous():
        raise RuntimeError("x must be a contiguous [num_tokens, hidden] tensor")
    if scales is None:
        if xs.dtype != torch.bfloat16:
            raise RuntimeError(f"x must be bf16, or an (fp8 e4m3, float32 scales) tuple; got {xs.dtype}")
    else:
        if xs.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32:
            raise RuntimeError(f"fp8 x must be (float8_e4m3fn, float32 scales), got ({xs.dtype}, {scales.dtype})")
        if scales.dim() != 2 or scales.shape[0] != xs.shape[0] or xs.shape[1] % FP8_BLOCK or \
                scales.shape[1] != xs.shape[1] // FP8_BLOCK:
            raise RuntimeError(f"fp8 scales must be [num_tokens, hidden/{FP8_BLOCK}], got {tuple(scales.shape)}")
    if (xs.shape[1] * xs.element_size()) % 16:
        raise RuntimeError("Failed: Assertion error: hidden * element_size % 16 == 0")


def _check_handle(handle: ReferenceHandle, cfg: ReferenceConfig, num_tokens: Optional[int]) -> None:
    if not isinstance(handle, ReferenceHandle):
        raise TypeError(f"not a reference handle: {type(handle).__name__}")
    # deep_ep.cpp L518/L802: channel_prefix_matrix.size(1) == num_sms / 2
    if handle.num_sms != cfg.num_sms:
        raise RuntimeError(f"Failed: Assertion error: the handle was made with num_sms={handle.num_sms} "
                           f"({handle.num_sms // 2} channels), the config has num_sms={cfg.num_sms}")
    if num_tokens is not None and num_tokens != handle.is_token_in_rank.shape[0]:
        raise RuntimeError(f"cached dispatch of {num_tokens} tokens with a handle of "
                           f"{handle.is_token_in_rank.shape[0]}")


# --- the collectives -----------------------------------------------------------------------------------------
class _Exchange:
    """The torch.distributed calls of one buffer's group. Every rank must call these in the same order."""

    def __init__(self, group: dist.ProcessGroup, group_size: int) -> None:
        self.group, self.group_size = group, group_size

    def counts(self, send_counts: tuple[int, ...]) -> tuple[int, ...]:
        """Rows each rank will send me, from the rows I send each rank."""
        send = torch.tensor(send_counts, dtype=torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return tuple(int(c) for c in recv.tolist())

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone().cpu()
        dist.all_reduce(t, group=self.group)
        return t

    def move(self, rows: torch.Tensor, is_token_in_rank: torch.Tensor, send_counts: tuple[int, ...],
             recv_counts: tuple[int, ...]) -> torch.Tensor:
        """Send row t to every rank j with is_token_in_rank[t, j]; receive in (source rank, token) order."""
        order = [rows[is_token_in_rank[:, j]] for j in range(self.group_size)]
        return self.move_rows(torch.cat(order), send_counts, recv_counts)

    def move_rows(self, rows: torch.Tensor, send_counts: tuple[int, ...] | list[int],
                  recv_counts: tuple[int, ...] | list[int]) -> torch.Tensor:
        """all_to_all of whole rows, as bytes (gloo has no bf16/fp8 types); rows are grouped by destination."""
        tail = tuple(rows.shape[1:])
        row_bytes = rows.element_size() * math.prod(tail)
        flat = rows.contiguous().reshape(rows.shape[0], math.prod(tail)).view(torch.uint8)
        out = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8, device=rows.device)
        dist.all_to_all_single(out, flat.reshape(-1), [c * row_bytes for c in recv_counts],
                               [c * row_bytes for c in send_counts], group=self.group)
        return out.view(sum(recv_counts), row_bytes).view(rows.dtype).reshape(sum(recv_counts), *tail)


# --- dispatch, after the checks --------------------------------------------------------------------------------
def _cached_dispatch(ex: _Exchange, xs: torch.Tensor, scales: Optional[torch.Tensor],
                     handle: ReferenceHandle) -> XType:
    """A dispatch along a handle's routes: x (and its fp8 scales) only, no top-k, no counts."""
    recv = ex.move(xs, handle.is_token_in_rank, handle.send_counts, handle.recv_counts)
    recv = _pad_rows(recv, handle.num_recv_rows)
    if scales is None:
        return recv
    recv_scales = _pad_rows(ex.move(scales, handle.is_token_in_rank, handle.send_counts,
                                    handle.recv_counts), handle.num_recv_rows)
    return recv, recv_scales


def _fresh_dispatch(ex: _Exchange, me: int, cfg: ReferenceConfig, xs: torch.Tensor, scales: Optional[torch.Tensor],
                    is_token_in_rank: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                    topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor], expert_alignment: int,
                    num_worst_tokens: int
                    ) -> tuple[XType, Optional[torch.Tensor], Optional[torch.Tensor], list[int], ReferenceHandle]:
    """A non-cached dispatch from the layout: everything DeepEP returns but the event. The collectives run in
    this order on every rank: counts, source indices, x, scales, top-k indices and weights, expert counts."""
    send_counts = tuple(int(c) for c in is_token_in_rank.sum(0).tolist())
    recv_counts = ex.counts(send_counts)
    src_idx = torch.arange(xs.shape[0], dtype=torch.int64, device=xs.device)
    recv_src_idx = ex.move(src_idx, is_token_in_rank, send_counts, recv_counts)
    num_recv = recv_src_idx.shape[0]
    rows = num_recv
    if num_worst_tokens > 0:
        if num_worst_tokens < num_recv:
            raise RuntimeError(f"num_worst_tokens ({num_worst_tokens}) < received tokens ({num_recv})")
        rows = num_worst_tokens
    recv_x = _pad_rows(ex.move(xs, is_token_in_rank, send_counts, recv_counts), rows)
    recv_scales = None
    if scales is not None:
        recv_scales = _pad_rows(ex.move(scales, is_token_in_rank, send_counts, recv_counts), rows)

    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        assert topk_weights is not None
        per_rank = num_tokens_per_expert.numel() // ex.group_size
        lo = me * per_rank
        got_idx = ex.move(topk_idx, is_token_in_rank, send_counts, recv_counts)
        got_w = ex.move(topk_weights.float(), is_token_in_rank, send_counts, recv_counts)
        local = (got_idx >= lo) & (got_idx < lo + per_rank)
        recv_topk_idx = _pad_rows(torch.where(local, got_idx - lo, torch.full_like(got_idx, -1)), rows, -1)
        recv_topk_weights = _pad_rows(torch.where(local, got_w, torch.zeros_like(got_w)), rows, 0)

    # DeepEP skips the per-expert count list when num_worst_tokens pads the output
    counts_list = _expert_counts(ex, me, num_tokens_per_expert, expert_alignment) if num_worst_tokens == 0 else []
    new_handle = ReferenceHandle(cfg.num_sms, is_token_in_rank.clone(), send_counts, recv_counts,
                                 _pad_rows(recv_src_idx, rows, -1), rows)
    out_x: XType = (recv_x, recv_scales) if recv_scales is not None else recv_x
    return out_x, recv_topk_idx, recv_topk_weights, counts_list, new_handle


def _expert_counts(ex: _Exchange, me: int, num_tokens_per_expert: torch.Tensor, expert_alignment: int) -> list[int]:
    """num_recv_tokens_per_expert_list: every rank's counts for my experts, summed, aligned up."""
    total = ex.sum_over_ranks(num_tokens_per_expert.to(torch.int64))
    per_rank = total.numel() // ex.group_size
    mine = total[me * per_rank:(me + 1) * per_rank].tolist()
    return [-(-int(c) // expert_alignment) * expert_alignment for c in mine]


def _pad_rows(t: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
    """Pad to `rows` rows (num_worst_tokens): DeepEP leaves the tail unspecified; we fill it (-1 for top-k)."""
    if t.shape[0] >= rows:
        return t
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _biases(bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None]) -> list[torch.Tensor]:
    if bias is None:
        return []
    if isinstance(bias, torch.Tensor):
        return [bias]
    return [b for b in bias if b is not None]
