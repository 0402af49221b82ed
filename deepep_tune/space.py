"""The config space: what a candidate is, what DeepEP accepts, and which candidates a mode sweeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from .workload import Workload

OPS = ("dispatch", "combine")
SUPPORTED_RANKS = (2, 4, 8)

# Buffer.get_{dispatch,combine}_config in DeepEP v1 (deep_ep/buffer.py; buffers/legacy.py in v2):
# (nvl_chunk, nvl_buffer) per rank count; num_sms comes from Buffer.num_sms (default 20).
# Config fields are not readable from Python, so the table is kept here to log and compare.
DEEPEP_DEFAULTS = {
    "dispatch": {2: (24, 256), 4: (6, 256), 8: (6, 256)},
    "combine": {2: (10, 256), 4: (9, 256), 8: (4, 256)},
}
DEEPEP_DEFAULT_NUM_SMS = 20
# The tuple the tool we replace tells everyone to paste, and upstream's test_intranode config.
COMMUNITY_CONFIG = (24, 8, 256)
# RDMA fields are ignored intranode but Config() still validates them; DeepEP's own tables use these.
RDMA_CHUNK, RDMA_BUFFER = 6, 128


@dataclass(frozen=True, order=True)
class TuneConfig:
    """One candidate: the three knobs that matter intranode."""

    num_sms: int
    nvl_chunk: int
    nvl_buffer: int

    def __str__(self) -> str:
        return f"({self.num_sms}, {self.nvl_chunk}, {self.nvl_buffer})"

    def as_dict(self) -> dict[str, int]:
        return {"num_sms": self.num_sms, "nvl_chunk": self.nvl_chunk, "nvl_buffer": self.nvl_buffer}

    def error(self) -> str | None:
        return config_error(self.num_sms, self.nvl_chunk, self.nvl_buffer)

    def config_kwargs(self) -> dict[str, int]:
        """Keyword arguments of deep_ep.Config, in its own names (what SGLang's --deepep-config reads)."""
        return {
            "num_sms": self.num_sms,
            "num_max_nvl_chunked_send_tokens": self.nvl_chunk,
            "num_max_nvl_chunked_recv_tokens": self.nvl_buffer,
            "num_max_rdma_chunked_send_tokens": RDMA_CHUNK,
            "num_max_rdma_chunked_recv_tokens": RDMA_BUFFER,
        }


def config_error(num_sms: int, nvl_chunk: int, nvl_buffer: int, rdma_chunk: int = RDMA_CHUNK,
                 rdma_buffer: int = RDMA_BUFFER) -> str | None:
    """Why DeepEP would not run Config(num_sms, nvl_chunk, nvl_buffer, rdma_chunk, rdma_buffer), or None.
    The Config constructor's host asserts (csrc/config.hpp) plus the kernels' launch rules: num_sms even
    (one channel is a sender and a receiver SM) and positive (the ctor allows 0, the launch of an empty grid
    fails). The only definition of validity: the space, the reference backend and every paste target use it."""
    if num_sms <= 0 or num_sms % 2:
        return f"num_sms={num_sms} must be a positive even number (one channel is two SMs)"
    if not 0 < nvl_chunk < nvl_buffer:
        return f"need 0 < nvl_chunk < nvl_buffer, got nvl_chunk={nvl_chunk}, nvl_buffer={nvl_buffer}"
    if not (rdma_chunk > 0 and rdma_buffer > 0):
        return f"rdma sizes must be positive, got {rdma_chunk}, {rdma_buffer}"
    aligned = (rdma_buffer + rdma_chunk - 1) // rdma_chunk * rdma_chunk
    if not rdma_chunk <= aligned // 2:
        return f"need rdma_chunk ({rdma_chunk}) <= rdma_buffer/2 ({aligned // 2})"
    return None


def deepep_default(op: str, num_ranks: int, num_sms: int = DEEPEP_DEFAULT_NUM_SMS) -> TuneConfig:
    chunk, buffer = DEEPEP_DEFAULTS[op][num_ranks]
    return TuneConfig(num_sms, chunk, buffer)


def nvl_bytes(op: str, cfg: TuneConfig, num_ranks: int, w: Workload) -> int:
    """Bytes of the NVL buffer op needs at cfg: the host asserts of deep_ep.cpp intranode_dispatch (L680-690)
    and intranode_combine (L860-864)."""
    channels, r = cfg.num_sms // 2, num_ranks
    if op == "dispatch":
        slot = w.hidden_bytes + 4 + w.num_topk * 8 + w.num_topk * 4 + 4 * w.num_scales
        return r * r * 4 + channels * r * 4 * 4 + channels * r * cfg.nvl_buffer * slot
    return channels * r * 8 + channels * r * cfg.nvl_buffer * (w.hidden * 2 + 4 + w.num_topk * 4)


INT32_MAX = 2**31 - 1


def int32_view_bytes(op: str, cfg: TuneConfig, num_ranks: int, w: Workload) -> dict[str, int]:
    """Bytes of each view the intranode kernel carves from the NVL buffer, each followed by another view.
    DeepEP v1.2.1's device-side Buffer<T> (csrc/kernels/buffer.cuh L14-22) keeps total_bytes in a 32-bit int
    and advances the pointer by it, so one view over 2^31-1 bytes misplaces every later view (out-of-bounds
    writes on the peer). Views of csrc/kernels/intranode.cu: dispatch L206-221, combine L620-634."""
    c, r, n = cfg.num_sms // 2, num_ranks, cfg.nvl_buffer
    if op == "dispatch":
        return {"x": c * r * n * w.hidden_bytes, "src_idx": 4 * c * r * n, "topk_idx": 8 * c * r * n * w.num_topk,
                "topk_weights": 4 * c * r * n * w.num_topk}
    return {"x": c * r * n * 2 * w.hidden, "src_idx": 4 * c * r * n}


def int32_overflow(op: str, cfg: TuneConfig, num_ranks: int, w: Workload) -> str | None:
    """Why DeepEP's 32-bit buffer views cannot hold op at cfg, or None."""
    big = {k: v for k, v in int32_view_bytes(op, cfg, num_ranks, w).items() if v > INT32_MAX}
    if not big:
        return None
    return f"{op} view(s) {', '.join(f'{k}={v}' for k, v in big.items())} bytes exceed DeepEP's 32-bit limit"


def nvl_bytes_needed(dispatch: TuneConfig, combine: TuneConfig, w: Workload, num_ranks: int) -> dict[str, int]:
    d, c = nvl_bytes("dispatch", dispatch, num_ranks, w), nvl_bytes("combine", combine, num_ranks, w)
    return {"dispatch": d, "combine": c, "num_nvl_bytes": align(max(d, c))}


def nvl_size_hint(cfg: TuneConfig, hidden_bytes: int, num_ranks: int) -> int:
    """deep_ep.Config.get_nvl_buffer_size_hint (csrc/config.hpp L52-74) for an NVSHMEM build, intranode: an
    upper bound assuming top-k <= 128. Frameworks that size deep_ep.Buffer from get_dispatch/combine_config
    allocate this; DeepEP's README passes hidden_bytes = hidden * max(elem_size, 2)."""
    c, r, n = cfg.num_sms // 2, min(num_ranks, 8), cfg.nvl_buffer
    total = c * r * (2 * 1 + 3) * 4 + c * r * n * hidden_bytes + c * r * n * 8 + c * r * n * 128 * (8 + 4 + 4)
    return align(total)


def align(n: int, to: int = 128) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Space:
    """The candidates each op may be measured at. Both ops share the num_sms axis (the handle couples them)."""

    dispatch: tuple[TuneConfig, ...]
    combine: tuple[TuneConfig, ...]

    def configs(self, op: str) -> tuple[TuneConfig, ...]:
        return self.dispatch if op == "dispatch" else self.combine

    def sms_values(self) -> list[int]:
        return sorted({c.num_sms for c in self.dispatch} & {c.num_sms for c in self.combine})

    def grid(self, op: str, num_sms: int) -> list[TuneConfig]:
        return sorted(c for c in self.configs(op) if c.num_sms == num_sms)

    def size(self) -> int:
        return len(self.dispatch) + len(self.combine)

    def restrict(self, max_sms: int | None) -> "Space":
        if max_sms is None:
            return self
        keep = lambda cs: tuple(c for c in cs if c.num_sms <= max_sms)  # noqa: E731
        return Space(keep(self.dispatch), keep(self.combine))


@dataclass(frozen=True)
class Axes:
    """Named ranges a mode sweeps; expanded with a product and filtered before anything runs."""

    sms: tuple[int, ...]
    dispatch_chunks: tuple[int, ...]
    combine_chunks: tuple[int, ...]
    buffers: tuple[int, ...]


def mode_axes(mode: str, sms_cap: int) -> Axes:
    """The grid each mode covers. quick and full cover the same grid; quick searches it sparsely."""
    del mode  # both modes cover one grid; the search strategy is what differs
    small = list(range(4, 33, 4))
    large = list(range(40, sms_cap + 1, 8))
    sms = sorted({s for s in small + large if s <= sms_cap} | ({sms_cap} if sms_cap >= 2 else set()))
    return Axes(
        sms=tuple(sms),
        dispatch_chunks=tuple(range(2, 33, 2)),
        combine_chunks=tuple(range(1, 17)),
        buffers=(128, 192, 256, 384, 512),
    )


def build_space(axes: Axes, fits: Callable[[str, TuneConfig], bool]) -> tuple[Space, int]:
    """Product of the axes, keeping only configs DeepEP accepts and `fits` admits. Returns (space, pruned)."""
    ops: dict[str, list[TuneConfig]] = {"dispatch": [], "combine": []}
    pruned = 0
    for op, chunks in (("dispatch", axes.dispatch_chunks), ("combine", axes.combine_chunks)):
        for s in axes.sms:
            for chunk in chunks:
                for buf in axes.buffers:
                    cfg = TuneConfig(s, chunk, buf)
                    if cfg.error() is None and fits(op, cfg):
                        ops[op].append(cfg)
                    else:
                        pruned += 1
    return Space(tuple(ops["dispatch"]), tuple(ops["combine"])), pruned


def space_from_points(points: Iterable[tuple[str, TuneConfig]]) -> Space:
    ops: dict[str, set[TuneConfig]] = {"dispatch": set(), "combine": set()}
    for op, cfg in points:
        ops[op].add(cfg)
    return Space(tuple(sorted(ops["dispatch"])), tuple(sorted(ops["combine"])))
