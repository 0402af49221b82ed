"""The MoE workload being tuned for: shapes, reproducible routing, and what every rank must receive."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import torch

FP8_BLOCK = 128  # DeepEP's per-token FP8 scales cover 128-wide blocks of the hidden dimension


@dataclass(frozen=True)
class Workload:
    num_tokens: int = 4096
    """Tokens per rank."""
    hidden: int = 7168
    num_topk: int = 8
    num_experts: int = 256
    dispatch_dtype: str = "bf16"
    """bf16 or fp8 (e4m3 with per-128 float scales); combine is always bf16."""
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def elem_size(self) -> int:
        return 1 if self.dispatch_dtype == "fp8" else 2

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * self.elem_size

    @property
    def num_scales(self) -> int:
        return self.hidden // FP8_BLOCK if self.dispatch_dtype == "fp8" else 0


def workload_error(w: Workload, num_ranks: int) -> str | None:
    """Why DeepEP's intranode kernels cannot run this workload on num_ranks, or None."""
    if w.num_tokens <= 0:
        return f"--num-tokens must be positive, got {w.num_tokens}"
    if w.dispatch_dtype not in ("bf16", "fp8"):
        return f"--dispatch-dtype must be bf16 or fp8, got {w.dispatch_dtype!r}"
    if w.num_experts <= 0 or w.num_experts % num_ranks:
        return f"--num-experts {w.num_experts} must be a positive multiple of the rank count {num_ranks}"
    if w.num_experts // num_ranks > 128:
        return f"--num-experts {w.num_experts} gives {w.num_experts // num_ranks} experts per rank; DeepEP allows at most 128"
    if not 1 <= w.num_topk <= min(32, w.num_experts):
        return f"--num-topk must be between 1 and min(32, num_experts), got {w.num_topk}"
    if w.hidden <= 0:
        return f"--hidden must be positive, got {w.hidden}"
    if w.dispatch_dtype == "fp8" and w.hidden % FP8_BLOCK:
        return f"--hidden {w.hidden} must be a multiple of {FP8_BLOCK} for fp8 dispatch (per-block scales)"
    # bf16 rows are used by dispatch (bf16 mode) and by combine: DeepEP's SM90 TMA path moves a row as
    # an even number of 16-byte units and stages half a row plus 8 bytes in 8 KiB of shared memory.
    if (w.hidden * 2) % 32:
        return f"--hidden {w.hidden} must be a multiple of 16 (DeepEP moves bf16 rows in pairs of 16-byte units)"
    if w.hidden * 2 // 2 + 8 > 8192:
        return f"--hidden {w.hidden} is too large for DeepEP's SM90 TMA path (bf16 rows up to hidden 8184)"
    return None


@dataclass(frozen=True)
class Routing:
    """One rank's top-k routing and the layout DeepEP derives from it (get_dispatch_layout)."""

    topk_idx: torch.Tensor  # [T, K] int64
    topk_weights: torch.Tensor  # [T, K] float32
    num_ranks: int
    num_experts: int

    @cached_property
    def rank_of_slot(self) -> torch.Tensor:
        return self.topk_idx // (self.num_experts // self.num_ranks)

    @cached_property
    def is_token_in_rank(self) -> torch.Tensor:  # [T, R] bool
        t = self.topk_idx.shape[0]
        m = torch.zeros(t, self.num_ranks, dtype=torch.bool)
        m.scatter_(1, self.rank_of_slot, True)
        return m

    @cached_property
    def num_tokens_per_rank(self) -> torch.Tensor:
        return self.is_token_in_rank.sum(0).to(torch.int32)

    @cached_property
    def num_tokens_per_expert(self) -> torch.Tensor:
        return torch.bincount(self.topk_idx.flatten(), minlength=self.num_experts).to(torch.int32)


def make_routing(w: Workload, rank: int, num_ranks: int) -> Routing:
    """DeepEP's test routing: top-k of random positive scores over all experts, seeded per rank (on CPU,
    so every rank can rebuild every other rank's routing and the result does not depend on the device)."""
    g = torch.Generator().manual_seed(w.seed * 1_000_003 + rank)
    scores = torch.randn(w.num_tokens, w.num_experts, generator=g).abs() + 1
    topk_idx = torch.topk(scores, w.num_topk, dim=-1, sorted=False).indices
    topk_weights = torch.rand(w.num_tokens, w.num_topk, generator=g) + 0.5
    return Routing(topk_idx, topk_weights, num_ranks, w.num_experts)


def token_values(rank: int, num_tokens: int) -> torch.Tensor:
    """The value every element of a source row carries: names the source rank and token (mod 8).
    Values stay within bf16's 8 significant bits, so dispatched rows compare exactly."""
    return (rank + 1) * 8 + torch.arange(num_tokens) % 8


@dataclass(frozen=True)
class Expected:
    """What one rank must receive from dispatch, in DeepEP's order (by source rank, then token)."""

    recv_values: torch.Tensor  # [num_recv] float32: the value of each received row
    recv_src: torch.Tensor  # [num_recv] int64: the source rank of each received row
    recv_topk_idx: torch.Tensor  # [num_recv, K] local expert index or -1
    recv_topk_weights: torch.Tensor  # [num_recv, K] weight or 0 where the expert is elsewhere
    num_recv_per_expert: list[int]
    copies: torch.Tensor  # [T] how many ranks this rank's own tokens go to (combine multiplies by it)


def expected_for_rank(w: Workload, me: int, num_ranks: int, routings: list[Routing] | None = None) -> Expected:
    routings = routings or [make_routing(w, r, num_ranks) for r in range(num_ranks)]
    per_rank = w.num_experts // num_ranks
    lo, hi = me * per_rank, (me + 1) * per_rank
    vals, srcs, idxs, wts = [], [], [], []
    for src, rt in enumerate(routings):
        sel = rt.is_token_in_rank[:, me]
        vals.append(token_values(src, w.num_tokens)[sel].float())
        srcs.append(torch.full((int(sel.sum()),), src, dtype=torch.int64))
        idx = rt.topk_idx[sel]
        local = (idx >= lo) & (idx < hi)
        idxs.append(torch.where(local, idx - lo, torch.full_like(idx, -1)))
        wts.append(torch.where(local, rt.topk_weights[sel], torch.zeros_like(rt.topk_weights[sel])))
    recv_idx = torch.cat(idxs)
    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=per_rank)
    return Expected(
        recv_values=torch.cat(vals),
        recv_src=torch.cat(srcs),
        recv_topk_idx=recv_idx,
        recv_topk_weights=torch.cat(wts),
        num_recv_per_expert=counts.tolist(),
        copies=routings[me].is_token_in_rank.sum(1),
    )


@dataclass(frozen=True)
class Traffic:
    """Rows each rank receives in dispatch (and sends back in combine)."""

    recv_rows: list[int]  # per rank, including rows a rank sends to itself
    remote_rows: list[int]  # per rank, only rows from other ranks (what crosses NVLink)


def traffic(w: Workload, num_ranks: int) -> Traffic:
    routings = [make_routing(w, r, num_ranks) for r in range(num_ranks)]
    recv = [sum(int(rt.num_tokens_per_rank[me]) for rt in routings) for me in range(num_ranks)]
    local = [int(routings[me].num_tokens_per_rank[me]) for me in range(num_ranks)]
    return Traffic(recv, [r - l for r, l in zip(recv, local)])
