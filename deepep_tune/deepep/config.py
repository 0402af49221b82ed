"""DeepEP v1's Config: the one model of deep_ep.Config (five fields, pybind defaults, validity), DeepEP's default
tables, and the knob declaration the tuner searches (what matters intranode: num_sms, nvl_chunk, nvl_buffer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..knobs import OPS, Baseline, Knobs, KnobSpace
from .buffer import fits, nvl_bytes_needed

SUPPORTED_RANKS = (2, 4, 8)
KNOBS = ("num_sms", "nvl_chunk", "nvl_buffer")

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
# deep_ep.Config's keyword arguments and their pybind defaults (deep_ep.cpp L1345-1349).
CONFIG_KEYS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
               "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")
PYBIND_DEFAULTS = (20, 6, 256, 6, 256)


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


@dataclass(frozen=True)
class ConfigArgs:
    """The five deep_ep.Config constructor arguments, normalised (defaults filled in)."""

    num_sms: int
    nvl_chunk: int
    nvl_buffer: int
    rdma_chunk: int = RDMA_CHUNK
    rdma_buffer: int = RDMA_BUFFER

    @classmethod
    def from_call(cls, args: tuple, kwargs: Mapping[str, Any]) -> Optional["ConfigArgs"]:
        """From the arguments a Config(...) call got; None if they are not five ints by pybind's rules."""
        if len(args) > len(CONFIG_KEYS) or any(k not in CONFIG_KEYS for k in kwargs):
            return None
        values = list(PYBIND_DEFAULTS)
        values[:len(args)] = args
        for k, v in kwargs.items():
            values[CONFIG_KEYS.index(k)] = v
        try:
            return cls(*(int(v) for v in values))
        except (TypeError, ValueError):
            return None

    @classmethod
    def of(cls, cfg: Knobs) -> "ConfigArgs":
        """The Config a tuned candidate is run with (DeepEP's own RDMA values, ignored intranode)."""
        return cls(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer)

    def error(self) -> str | None:
        return config_error(*self.as_tuple())

    def knobs(self) -> tuple[int, int, int]:
        """What matters intranode: (num_sms, nvl_chunk, nvl_buffer). The RDMA fields are ignored there."""
        return self.num_sms, self.nvl_chunk, self.nvl_buffer

    def tuned(self) -> Knobs:
        return TuneConfig(*self.knobs())

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return self.num_sms, self.nvl_chunk, self.nvl_buffer, self.rdma_chunk, self.rdma_buffer

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments of deep_ep.Config, in its own names (what SGLang's --deepep-config reads)."""
        return dict(zip(CONFIG_KEYS, self.as_tuple()))

    def __str__(self) -> str:
        return f"({self.num_sms}, {self.nvl_chunk}, {self.nvl_buffer})"


def TuneConfig(num_sms: int, nvl_chunk: int, nvl_buffer: int) -> Knobs:  # noqa: N802 (reads like a type)
    """A v1 candidate: the three knobs that matter intranode."""
    return Knobs((("num_sms", num_sms), ("nvl_chunk", nvl_chunk), ("nvl_buffer", nvl_buffer)))


def deepep_default(op: str, num_ranks: int, num_sms: int = DEEPEP_DEFAULT_NUM_SMS) -> Knobs:
    chunk, buffer = DEEPEP_DEFAULTS[op][num_ranks]
    return TuneConfig(num_sms, chunk, buffer)


def grid(sms_cap: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """The grid both modes cover (quick searches it sparsely): num_sms 4..32 step 4, then step 8 up to the cap."""
    small = list(range(4, 33, 4))
    large = list(range(40, sms_cap + 1, 8))
    sms = tuple(sorted({s for s in small + large if s <= sms_cap} | ({sms_cap} if sms_cap >= 2 else set())))
    buffers = (128, 192, 256, 384, 512)
    return {"dispatch": {"num_sms": sms, "nvl_chunk": tuple(range(2, 33, 2)), "nvl_buffer": buffers},
            "combine": {"num_sms": sms, "nvl_chunk": tuple(range(1, 17)), "nvl_buffer": buffers}}


def probe(op: str, configs: list[Knobs]) -> Knobs:
    """A mid-range chunk and buffer 256 (DeepEP's default buffer), or the nearest config present."""
    chunks = sorted({c.nvl_chunk for c in configs})
    target = (chunks[len(chunks) // 3], 256)
    return min(configs, key=lambda c: (abs(c.nvl_chunk - target[0]) / max(chunks),
                                       abs(c.nvl_buffer - target[1]) / 256, c))


def baselines(ep_size: int, answer_sms: int, facts: Mapping[str, Any] | None = None) -> list[Baseline]:
    r = ep_size
    return [
        Baseline("deepep_default", f"DeepEP's get_dispatch/combine_config for {r} ranks at the tuned num_sms",
                 deepep_default("dispatch", r, answer_sms), deepep_default("combine", r, answer_sms)),
        Baseline("deepep_default_20sms", f"DeepEP as shipped: Buffer.num_sms={DEEPEP_DEFAULT_NUM_SMS} and its "
                                         f"{r}-rank table", deepep_default("dispatch", r), deepep_default("combine", r)),
        Baseline("community_24_8_256", "Config(24, 8, 256) for both ops (upstream test and widely pasted)",
                 TuneConfig(*COMMUNITY_CONFIG), TuneConfig(*COMMUNITY_CONFIG)),
    ]


def baseline_configs(ep_size: int, sms_values: list[int]) -> list[tuple[str, Knobs]]:
    """Every config a baseline may measure: DeepEP's table at any num_sms of the space, and (24, 8, 256)."""
    return [(op, deepep_default(op, ep_size, s)) for op in OPS for s in set(sms_values) | {DEEPEP_DEFAULT_NUM_SMS}] \
        + [(op, TuneConfig(*COMMUNITY_CONFIG)) for op in OPS]


V1 = KnobSpace(
    library="deepep-v1",
    knobs={"dispatch": KNOBS, "combine": KNOBS},
    shared=("num_sms",),  # a dispatch handle fixes num_sms for the combine that uses it
    grid=grid,
    error=lambda op, cfg: config_error(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer),
    baselines=baselines,
    layer_baselines=("deepep_default_20sms", "community_24_8_256"),  # as shipped; the widely pasted config
    fits=fits,
    probe=probe,
    buffer_needs=nvl_bytes_needed,
    notes={"api": "deep_ep.Buffer with deep_ep.Config(num_sms, nvl_chunk, nvl_buffer) (v1; buffers/legacy.py in V2)"},
)
