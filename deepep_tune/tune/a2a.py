"""Baseline: torch.distributed.all_to_all_single moving the same tokens as dispatch and combine (what
torchtitan's "standard" token dispatcher does: a count exchange, then the rows), and NCCL's time for the
rows alone, which says what the node's links give an all-to-all of the same bytes."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..deepep.routing import make_routing
from ..deepep.workload import Workload
from .timing import Timer, bench_parts, reduce_samples


def time_all_to_all(w: Workload, rank: int, world: int, device: torch.device, group: Any, timer: Timer,
                    warmup: int, iters: int, flush: Any = None) -> dict[str, Any]:
    rt = make_routing(w, rank, world)
    send_rows = rt.num_tokens_per_rank.tolist()
    order = torch.cat([rt.is_token_in_rank[:, d].nonzero().flatten() for d in range(world)])
    dtype = torch.bfloat16 if w.dispatch_dtype == "bf16" else torch.uint8  # fp8 rows travel as bytes
    x = torch.ones(w.num_tokens, w.hidden, dtype=dtype, device=device)
    counts = torch.tensor(send_rows, dtype=torch.int64, device=device)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_rows = recv_counts.tolist()
    send = x[order.to(device)]
    recv = torch.empty(sum(recv_rows), w.hidden, dtype=dtype, device=device)
    back_send = torch.ones(sum(recv_rows), w.hidden, dtype=torch.bfloat16, device=device)
    back = torch.empty(send.shape[0], w.hidden, dtype=torch.bfloat16, device=device)

    def dispatch() -> None:
        c = torch.empty_like(counts)
        dist.all_to_all_single(c, counts, group=group)
        rows = c.tolist()  # the host needs the counts to size the receive buffer: a CPU sync, as in DeepEP
        dist.all_to_all_single(recv[:sum(rows)], send, rows, send_rows, group=group)

    def dispatch_rows() -> None:
        dist.all_to_all_single(recv, send, recv_rows, send_rows, group=group)

    def combine() -> None:
        dist.all_to_all_single(back, back_send, send_rows, recv_rows, group=group)

    out: dict[str, Any] = {}
    for name, fn in (("dispatch", dispatch), ("dispatch_rows", dispatch_rows), ("combine", combine)):
        samples = bench_parts([fn], warmup=warmup, iters=iters, timer=timer, before_each=flush)[0]
        out[f"{name}_us"] = round(reduce_samples({name: samples}, (name,), False, iters).time_us, 2)
    out["total_us"] = round(out["dispatch_us"] + out["combine_us"], 2)
    out["what"] = ("torch.distributed.all_to_all_single: count exchange + rows (dispatch), rows back (combine); "
                   "dispatch_rows: the rows alone")
    return out
