"""Reproducible routing of a workload, and what every rank must receive from dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .workload import Workload


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
