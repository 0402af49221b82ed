"""Correctness checks of one dispatch/combine against the expected layout. Return an error string or None."""

from __future__ import annotations

import torch

from .routing import Expected


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
    want = exp.recv_values.to(recv_x.device)
    if recv_scales is None:
        got_ok = (recv_x.float() == want[:, None]).all(dim=1)
    else:
        deq = recv_x.float() * recv_scales.float().repeat_interleave(recv_x.shape[1] // recv_scales.shape[1], dim=1)
        got_ok = ((deq - want[:, None]).abs() <= 1e-3 * want[:, None]).all(dim=1)
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
    want = (own_values.float() * exp.copies.float()).to(torch.bfloat16).float().to(combined_x.device)
    ok = (combined_x.float() == want[:, None]).all(dim=1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        return f"combined row {bad} is {float(combined_x[bad, 0])}, expected {float(want[bad])}"
    if combined_weights is not None and not torch.allclose(combined_weights.cpu().float(), own_weights, atol=1e-6):
        return "combined top-k weights differ from the originals"
    return None
