"""CPU reference: DeepEP's intranode dispatch/combine semantics over torch.distributed (gloo).
It defines what a correct result is; its timings say nothing about a GPU node."""

from __future__ import annotations

import platform
from typing import Any

import torch
import torch.distributed as dist

from ..bench import wall_timer
from ..consumers import config_ctor_error
from ..space import RDMA_BUFFER, RDMA_CHUNK, TuneConfig
from ..workload import FP8_BLOCK, Workload
from .base import CombineOut, DispatchOut, TokenBackend


def _exchange(send: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
    """all_to_all_single of row blocks; dtypes gloo lacks travel as raw bytes."""
    row_shape = send.shape[1:]
    raw = send.contiguous().view(torch.uint8).reshape(send.shape[0], -1)
    out = torch.empty(sum(recv_rows), raw.shape[1], dtype=torch.uint8)
    dist.all_to_all_single(out, raw, recv_rows, send_rows)
    return out.view(send.dtype).reshape(-1, *row_shape)


class ReferenceBackend(TokenBackend):
    name = "reference"

    def __init__(self, workload: Workload, rank: int, num_ranks: int) -> None:
        super().__init__(rank, num_ranks)
        self.timer = wall_timer
        self.prepare(workload)

    def prepare(self, workload: Workload) -> None:
        super().prepare(workload)
        num_ranks = self.num_ranks
        values = self.own_values
        x = values[:, None].expand(workload.num_tokens, workload.hidden)
        if workload.dispatch_dtype == "fp8":
            scales = (values / 448.0)[:, None].expand(-1, workload.hidden // FP8_BLOCK).contiguous()
            self.x: Any = ((x / scales[:, :1]).to(torch.float8_e4m3fn), scales)
        else:
            self.x = x.to(torch.bfloat16).contiguous()
        rt = self.routing
        # Rows for each destination, in token order: DeepEP's receive order within a source rank.
        self.send_index = [rt.is_token_in_rank[:, dst].nonzero().flatten() for dst in range(num_ranks)]
        self.send_rows = [int(i.numel()) for i in self.send_index]
        per_rank = workload.num_experts // num_ranks
        self.send_topk = []
        for dst, idx in enumerate(self.send_index):
            e = rt.topk_idx[idx]
            local = (e >= dst * per_rank) & (e < (dst + 1) * per_rank)
            self.send_topk.append((torch.where(local, e - dst * per_rank, -1),
                                   torch.where(local, rt.topk_weights[idx], 0.0)))
        self.combine_in = self.expected.recv_values.to(torch.bfloat16)[:, None].expand(-1, workload.hidden).contiguous()

    @staticmethod
    def _validate(cfg: TuneConfig) -> None:
        """DeepEP rejects bad configs on the host before launch; so does the reference."""
        err = config_ctor_error(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)
        if err or cfg.num_sms == 0:
            raise ValueError(f"Config{(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer)} rejected: {err or 'num_sms=0'}")

    def _dispatch(self, cfg: TuneConfig) -> DispatchOut:
        self._validate(cfg)
        # The count exchange stands for DeepEP's notify_dispatch + CPU sync of the non-cached path.
        counts = torch.tensor(self.send_rows, dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        recv_rows = recv_counts.tolist()
        cat = torch.cat(self.send_index)
        xs, scales = self.x if isinstance(self.x, tuple) else (self.x, None)
        recv_x = _exchange(xs[cat], self.send_rows, recv_rows)
        recv_scales = _exchange(scales[cat], self.send_rows, recv_rows) if scales is not None else None
        recv_idx = _exchange(torch.cat([t[0] for t in self.send_topk]), self.send_rows, recv_rows)
        recv_w = _exchange(torch.cat([t[1] for t in self.send_topk]), self.send_rows, recv_rows)
        per_expert = torch.bincount(recv_idx[recv_idx >= 0], minlength=self.workload.num_experts // self.num_ranks)
        handle = (recv_rows, cfg.num_sms)
        return DispatchOut(recv_x, recv_scales, recv_idx, recv_w, per_expert.tolist(), handle)

    def _combine(self, cfg: TuneConfig, handle: Any) -> CombineOut:
        self._validate(cfg)
        recv_rows, handle_sms = handle
        if handle_sms != cfg.num_sms:
            raise RuntimeError(f"handle made with num_sms={handle_sms} used with num_sms={cfg.num_sms}")
        back = _exchange(self.combine_in, recv_rows, self.send_rows)
        back_w = _exchange(self.expected.recv_topk_weights, recv_rows, self.send_rows)
        cat = torch.cat(self.send_index)
        out = torch.zeros(self.workload.num_tokens, self.workload.hidden, dtype=torch.float32)
        out.index_add_(0, cat, back.float())
        w = torch.zeros(self.workload.num_tokens, self.workload.num_topk, dtype=torch.float32)
        w.index_add_(0, cat, back_w)
        return CombineOut(out.to(torch.bfloat16), w)

    def describe(self) -> dict[str, Any]:
        return {"device_name": f"CPU ({platform.processor() or platform.machine()})", "colocated": False,
                "num_devices": 0, "device_sms": None}
