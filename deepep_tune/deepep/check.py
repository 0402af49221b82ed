"""Correctness checks of one dispatch/combine against the expected layout. Return an error string or None.

Every measured config is checked, so a check runs as often as a measurement: the comparisons stay on the
device, with the expectations copied there once, and end in one host sync; only a failure is explained row by
row (the earlier per-call host copies and float copies cost 1.5-2.2 ms per measurement on the H200 pair,
benchmarks/profile_rank.py)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .routing import Expected

_CACHE: dict[tuple[int, str], tuple[torch.Tensor, Any]] = {}
_CACHE_SIZE = 64  # a few workloads' expectations; a caller that passes fresh tensors only loses the speed-up


def _cached(t: torch.Tensor, what: str, make: Callable[[], Any]) -> Any:
    """make(), once per (tensor, what); the entry holds t, so its id is not reused while the entry lives."""
    key = (id(t), what)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = (t, make())
    return _CACHE[key][1]


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else _cached(t, str(device), lambda: t.to(device))


def _all_true(flags: list[torch.Tensor]) -> bool:
    return bool(torch.stack([f.reshape(()) for f in flags]).all()) if flags else True


def check_dispatch(
    exp: Expected,
    recv_x: torch.Tensor,
    recv_scales: torch.Tensor | None,
    recv_topk_idx: torch.Tensor | None,
    recv_topk_weights: torch.Tensor | None,
    num_recv_per_expert: list[int] | None,
    expert_alignment: int = 1,
) -> str | None:
    n = exp.recv_values.numel()
    if recv_x.shape[0] != n:
        return f"received {recv_x.shape[0]} tokens, expected {n}"
    want_counts = [-(-c // expert_alignment) * expert_alignment for c in exp.num_recv_per_expert]
    if num_recv_per_expert is not None and list(num_recv_per_expert) != want_counts:
        return f"per-expert counts {list(num_recv_per_expert)[:8]}... differ from expected {want_counts[:8]}..."
    dev = recv_x.device
    flags = [_rows_ok(recv_x, recv_scales, on_device(exp.recv_values, dev)).all()]
    if recv_topk_idx is not None:
        if recv_topk_idx.shape != exp.recv_topk_idx.shape:
            return "received top-k expert indices differ from the routing"
        flags.append((recv_topk_idx.long() == on_device(exp.recv_topk_idx, dev)).all())
    if recv_topk_weights is not None:
        if recv_topk_weights.shape != exp.recv_topk_weights.shape:
            return "received top-k weights differ from the routing"
        flags.append(torch.isclose(recv_topk_weights.float(), on_device(exp.recv_topk_weights, dev)).all())
    if _all_true(flags):
        return None
    return _explain_dispatch(exp, recv_x, recv_scales, recv_topk_idx, recv_topk_weights)


def _rows_ok(recv_x: torch.Tensor, recv_scales: torch.Tensor | None, want: torch.Tensor) -> torch.Tensor:
    """[num_recv] bool: each received row carries its token's value in every column."""
    if recv_scales is None:
        return (recv_x.float() == want[:, None]).all(dim=1) if recv_x.dtype != torch.bfloat16 or not _bf16_exact(want) \
            else (recv_x == _bf16(want)[:, None]).all(dim=1)
    n, groups = recv_x.shape[0], recv_scales.shape[1]
    deq = recv_x.reshape(n, groups, -1).float().mul_(recv_scales.float()[:, :, None])  # one temporary, scaled in place
    return deq.sub_(want[:, None, None]).abs_().le_(1e-3 * want.abs()[:, None, None]).flatten(1).all(dim=1)


def _bf16(want: torch.Tensor) -> torch.Tensor:
    return _cached(want, "bf16", lambda: want.to(torch.bfloat16))


def _bf16_exact(want: torch.Tensor) -> bool:
    """Whether the values survive bf16, so bf16 rows can be compared without a float copy of them."""
    return _cached(want, "bf16-exact", lambda: bool((want.to(torch.bfloat16).float() == want).all()))


def _explain_dispatch(exp: Expected, recv_x: torch.Tensor, recv_scales: torch.Tensor | None,
                      recv_topk_idx: torch.Tensor | None, recv_topk_weights: torch.Tensor | None) -> str | None:
    got_ok = _rows_ok(recv_x, recv_scales, on_device(exp.recv_values, recv_x.device))
    if not bool(got_ok.all()):
        bad = int((~got_ok).nonzero()[0])
        return f"received row {bad} (from rank {int(exp.recv_src[bad])}) has wrong data"
    if recv_topk_idx is not None and not torch.equal(recv_topk_idx.cpu().long(), exp.recv_topk_idx):
        return "received top-k expert indices differ from the routing"
    if recv_topk_weights is not None and not torch.allclose(recv_topk_weights.cpu().float(), exp.recv_topk_weights):
        return "received top-k weights differ from the routing"
    return None


def check_combine(
    exp: Expected,
    combined_x: torch.Tensor,
    own_values: torch.Tensor,
    combined_weights: torch.Tensor | None,
    own_weights: torch.Tensor,
) -> str | None:
    """Combine sums the copies of each token: every row must equal its value times its copy count."""
    dev = combined_x.device
    want = _cached(own_values, f"combined:{dev}",
                   lambda: (own_values.float() * exp.copies.float()).to(torch.bfloat16).float().to(dev))
    rows = (combined_x.float() == want[:, None]) if combined_x.dtype != torch.bfloat16 \
        else (combined_x == _bf16(want)[:, None])
    flags = [rows.all()]
    if combined_weights is not None:
        if combined_weights.shape != own_weights.shape:
            return "combined top-k weights differ from the originals"
        flags.append(torch.isclose(combined_weights.float(), on_device(own_weights, dev).float(), atol=1e-6).all())
    if _all_true(flags):
        return None
    ok = rows.all(dim=1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        return f"combined row {bad} is {float(combined_x[bad, 0])}, expected {float(want[bad])}"
    return "combined top-k weights differ from the originals"
