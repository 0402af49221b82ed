"""DeepEP v1's communication buffer: the bytes each op needs at a config (the host asserts DeepEP checks before a
launch), the size hint frameworks allocate, and the 32-bit view rule of its device-side buffer views."""

from __future__ import annotations

from ..knobs import Knobs
from .workload import Workload


def nvl_bytes(op: str, cfg: Knobs, num_ranks: int, w: Workload) -> int:
    """Bytes of the NVL buffer op needs at cfg: the host asserts of deep_ep.cpp intranode_dispatch (L680-690)
    and intranode_combine (L860-864)."""
    channels, r = cfg.num_sms // 2, num_ranks
    if op == "dispatch":
        slot = w.hidden_bytes + 4 + w.num_topk * 8 + w.num_topk * 4 + 4 * w.num_scales
        return r * r * 4 + channels * r * 4 * 4 + channels * r * cfg.nvl_buffer * slot
    return channels * r * 8 + channels * r * cfg.nvl_buffer * (w.hidden * 2 + 4 + w.num_topk * 4)


INT32_MAX = 2**31 - 1


def int32_view_bytes(op: str, cfg: Knobs, num_ranks: int, w: Workload) -> dict[str, int]:
    """Bytes of each view the intranode kernel carves from the NVL buffer, each followed by another view.
    DeepEP v1.2.1's device-side Buffer<T> (csrc/kernels/buffer.cuh L14-22) keeps total_bytes in a 32-bit int
    and advances the pointer by it, so one view over 2^31-1 bytes misplaces every later view (out-of-bounds
    writes on the peer). Views of csrc/kernels/intranode.cu: dispatch L206-221, combine L620-634."""
    c, r, n = cfg.num_sms // 2, num_ranks, cfg.nvl_buffer
    if op == "dispatch":
        return {"x": c * r * n * w.hidden_bytes, "src_idx": 4 * c * r * n, "topk_idx": 8 * c * r * n * w.num_topk,
                "topk_weights": 4 * c * r * n * w.num_topk}
    return {"x": c * r * n * 2 * w.hidden, "src_idx": 4 * c * r * n}


def int32_overflow(op: str, cfg: Knobs, num_ranks: int, w: Workload) -> str | None:
    """Why DeepEP's 32-bit buffer views cannot hold op at cfg, or None."""
    big = {k: v for k, v in int32_view_bytes(op, cfg, num_ranks, w).items() if v > INT32_MAX}
    if not big:
        return None
    return f"{op} view(s) {', '.join(f'{k}={v}' for k, v in big.items())} bytes exceed DeepEP's 32-bit limit"


def nvl_bytes_needed(dispatch: Knobs, combine: Knobs, w: Workload, num_ranks: int) -> dict[str, int]:
    d, c = nvl_bytes("dispatch", dispatch, num_ranks, w), nvl_bytes("combine", combine, num_ranks, w)
    return {"dispatch": d, "combine": c, "num_nvl_bytes": align(max(d, c))}


def nvl_size_hint(cfg: Knobs, hidden_bytes: int, num_ranks: int) -> int:
    """deep_ep.Config.get_nvl_buffer_size_hint (csrc/config.hpp L52-74) for an NVSHMEM build, intranode: an
    upper bound assuming top-k <= 128. Frameworks that size deep_ep.Buffer from get_dispatch/combine_config
    allocate this; DeepEP's README passes hidden_bytes = hidden * max(elem_size, 2)."""
    c, r, n = cfg.num_sms // 2, min(num_ranks, 8), cfg.nvl_buffer
    total = c * r * (2 * 1 + 3) * 4 + c * r * n * hidden_bytes + c * r * n * 8 + c * r * n * 128 * (8 + 4 + 4)
    return align(total)


def align(n: int, to: int = 128) -> int:
    return (n + to - 1) // to * to




def fits(op: str, cfg: Knobs, num_ranks: int, w: Workload, max_bytes: float) -> str | None:
    """Why one deep_ep.Buffer of at most max_bytes cannot run op at cfg, or None."""
    need = nvl_bytes(op, cfg, num_ranks, w)
    if need > max_bytes:
        return f"{op} at {cfg} needs {need} NVL bytes, more than {max_bytes:.0f}"
    return int32_overflow(op, cfg, num_ranks, w)
