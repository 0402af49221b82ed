"""What a backend offers the run, with defaults, and the dispatch/combine harness shared by the two backends
that move real tokens through a deep_ep.Buffer-like object (real DeepEP, or the CPU reference buffer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...deepep.buffer import align, nvl_bytes
from ...deepep.check import check_combine, check_dispatch
from ...deepep.config import V1, TuneConfig, baseline_configs
from ...deepep.routing import (
    Expected,
    Routing,
    expected_for_rank,
    make_routing,
    token_values,
)
from ...deepep.workload import Workload
from ...knobs import OPS, Knobs, KnobSpace, Space
from ..faults import extra_configs
from ..timing import Timer, bench_parts

OBJECTIVE_PARTS = {
    # What one measurement of an op times, per iteration. train: each MoE layer of a training step runs a
    # non-cached dispatch and a combine forward, and backward a combine (the gradient of dispatch) and a
    # cached dispatch of bf16 gradients with the forward's handle (the gradient of combine). The parts of
    # one op share its config, so the objective stays separable per op at one num_sms.
    "forward": {"dispatch": ("dispatch",), "combine": ("combine",)},
    "train": {"dispatch": ("dispatch", "cached_dispatch"), "combine": ("combine", "combine_bwd")},
}


@dataclass
class LocalResult:
    """One rank's view of one measurement: samples (us) per part, in OBJECTIVE_PARTS order."""

    parts: dict[str, list[float]]
    error: str | None = None  # check failure: the config ran but produced a wrong result


class Backend(ABC):
    """Everything the run asks of a backend. Defaults describe a backend that can measure any config and
    never loses its device."""

    name: str
    knob_space: KnobSpace = V1
    """The library's declaration: the knobs a config of this backend has (DeepEP v1's unless it says otherwise)."""
    objective: str = "forward"
    colocated = False
    sms_cap: int | None = None
    """Largest num_sms this run may use (set by the run, from the hardware and --max-sms); None: no limit."""
    workload: Workload | None = None

    @abstractmethod
    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        """Time op at cfg on this rank. May raise: the caller records the exception as a failed config."""

    def parts(self, op: str) -> tuple[str, ...]:
        return OBJECTIVE_PARTS[self.objective][op]

    def use(self, workload: Workload) -> None:
        """Measure this workload from now on (prepares it only when it changes)."""
        if workload != self.workload:
            self.prepare(workload)
            self.workload = workload

    def prepare(self, workload: Workload) -> None:
        """Build the inputs of a workload (another token count); the communication buffer is kept."""

    def facts(self) -> dict[str, Any]:
        """What the library's baselines need to know about this node (e.g. an SM count its model computed)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Hardware and software facts for the results file (may be slow: it runs beside the search)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """The few facts the log header needs, quickly (the full description follows in the results)."""
        return {k: v for k, v in self.describe().items() if k in ("device_name", "num_devices", "colocated")}

    def healthy(self) -> bool:
        """False once a failure has left the device unusable (the process must restart)."""
        return True

    def can_measure(self, op: str, cfg: Knobs) -> bool:
        """False for a config this backend cannot answer at all (a replayed landscape may lack it)."""
        return True

    def reused(self, op: str, cfg: Knobs, iters: int) -> None:
        """A resumed run took this measurement (of `iters` timed iterations) from its log instead of asking the
        backend."""

    def all_to_all(self, w: Workload, warmup: int, iters: int) -> dict[str, Any]:
        return {"skipped": f"the {self.name} backend moves no tokens"}

    def layer_check(self, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                    warmup: int, reference: str | None = None) -> dict[str, Any]:
        """One MoE layer timed with each candidate; speed-ups against `reference` (a candidate's name)."""
        return {"skipped": f"the {self.name} backend runs no MoE layer"}

    def close(self) -> None:
        pass


class TokenBackend(Backend):
    """Runs dispatch/combine through a deep_ep.Buffer-like `buffer` with configs from `make_config`, and
    checks every measured config. A combine needs a handle from a dispatch at the same num_sms; the last
    good one per num_sms is kept."""

    def __init__(self, buffer: Any, make_config: Callable[[Knobs], Any], timer: Timer, device: torch.device,
                 rank: int, num_ranks: int, objective: str, flush: Callable[[], object] | None = None,
                 a2a_group: Any = None) -> None:
        self.buffer, self.make_config, self.timer, self.device = buffer, make_config, timer, device
        self.rank, self.num_ranks, self.objective, self.flush, self.a2a_group = (rank, num_ranks, objective, flush,
                                                                                  a2a_group)

    def prepare(self, workload: Workload) -> None:
        self.workload = w = workload
        routings = [make_routing(w, r, self.num_ranks) for r in range(self.num_ranks)]
        self.routing: Routing = routings[self.rank]
        self.expected: Expected = expected_for_rank(w, self.rank, self.num_ranks, routings)
        self.own_values = token_values(self.rank, w.num_tokens).float()
        dev = self.device
        values = self.own_values.to(dev)
        rows = values[:, None].expand(w.num_tokens, w.hidden)
        # Backward moves bf16 gradients whatever the forward dtype.
        self.x_bf16 = rows.to(torch.bfloat16).contiguous()
        if w.dispatch_dtype == "fp8":
            # Column-major scales, as DeepEP's test and FP8 training recipes pass them.
            scales = (values / 448.0)[:, None].expand(-1, w.hidden // 128).T.contiguous().T
            self.x: Any = ((rows / scales[:, :1]).to(torch.float8_e4m3fn), scales)
        else:
            self.x = self.x_bf16
        idx_dtype = getattr(self.buffer_module(), "topk_idx_t", torch.int64)
        self.topk_idx = self.routing.topk_idx.to(dev, idx_dtype)
        self.topk_weights = self.routing.topk_weights.to(dev)
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(self.topk_idx, w.num_experts)
        if not (torch.equal(per_rank.cpu(), self.routing.num_tokens_per_rank)
                and torch.equal(per_expert.cpu(), self.routing.num_tokens_per_expert)
                and torch.equal(in_rank.cpu(), self.routing.is_token_in_rank)):
            raise RuntimeError("get_dispatch_layout disagrees with the reference layout")
        self.layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        self.combine_in = self.expected.recv_values.to(dev, torch.bfloat16)[:, None].expand(-1, w.hidden).contiguous()
        self.combine_w = self.expected.recv_topk_weights.to(dev)
        self.handles: dict[int, Any] = {}

    def buffer_module(self) -> Any:
        """The module of the buffer's API (deep_ep, or the reference), for optional names like topk_idx_t."""
        return None

    def _dispatch(self, config: Any) -> tuple:
        return self.buffer.dispatch(self.x, topk_idx=self.topk_idx, topk_weights=self.topk_weights, config=config,
                                    expert_alignment=self.workload.expert_alignment, **self.layout)

    def _cached_dispatch(self, config: Any, handle: Any) -> tuple:
        return self.buffer.dispatch(self.x_bf16, handle=handle, config=config,
                                    expert_alignment=self.workload.expert_alignment)

    def _combine(self, config: Any, handle: Any) -> tuple:
        return self.buffer.combine(self.combine_in, handle, topk_weights=self.combine_w, config=config)

    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        config = self.make_config(cfg)
        out: dict[str, Any] = {}
        if op == "dispatch":
            calls = {"dispatch": lambda: out.__setitem__("dispatch", self._dispatch(config)),
                     "cached_dispatch": lambda: out.__setitem__("cached", self._cached_dispatch(
                         config, out["dispatch"][4]))}
        else:
            handle = self.handles.get(cfg.num_sms)
            if handle is None:
                # Untimed dispatch for a handle: the smallest-footprint config at this num_sms.
                handle = self._dispatch(self.make_config(TuneConfig(cfg.num_sms, 4, 128)))[4]
                self.handles[cfg.num_sms] = handle
            calls = {"combine": lambda: out.__setitem__("combine", self._combine(config, handle)),
                     "combine_bwd": lambda: out.__setitem__("combine_bwd", self._combine(config, handle))}
        names = self.parts(op)
        samples = bench_parts([calls[n] for n in names], warmup=warmup, iters=iters, timer=self.timer,
                              before_each=self.flush)
        return LocalResult(dict(zip(names, samples)), self._check(op, cfg, out))

    def _check(self, op: str, cfg: Knobs, out: dict[str, Any]) -> str | None:
        if op == "combine":
            for name in ("combine", "combine_bwd"):
                if name in out:
                    combined, combined_w, _ = out[name]
                    err = check_combine(self.expected, combined, self.own_values, combined_w, self.routing.topk_weights)
                    if err:
                        return err
            return None
        recv_x, recv_idx, recv_w, per_expert, handle, _ = out["dispatch"]
        xs, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        err = check_dispatch(self.expected, xs, scales, recv_idx, recv_w, per_expert, self.workload.expert_alignment)
        if err is None and "cached" in out:
            err = check_dispatch(self.expected, out["cached"][0], None, None, None, None)
            err = err and f"cached dispatch: {err}"
        if err is None:  # a wrong dispatch's handle would make later combines look wrong too
            self.handles[cfg.num_sms] = handle
        return err

    def all_to_all(self, w: Workload, warmup: int, iters: int) -> dict[str, Any]:
        from ..a2a import time_all_to_all

        if self.colocated:
            return {"skipped": "NCCL cannot run several ranks on one GPU, and gloo would time host copies"}
        return time_all_to_all(w, self.rank, self.num_ranks, self.device, self.a2a_group, self.timer, warmup, iters,
                               self.flush)

    def layer_check(self, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                    warmup: int, reference: str | None = None) -> dict[str, Any]:
        from ..layer import layer_check

        return layer_check(self.buffer, self.make_config, shape, self.rank, self.num_ranks, self.device, candidates,
                           rounds=rounds, warmup=warmup, reference=reference)


def buffer_bytes(space: Space, world: int, w: Workload, sms_cap: int) -> int:
    """One deep_ep.Buffer serves the whole run: sized for the largest config of the space or the baselines
    (DeepEP asserts the NVL bytes of every dispatch/combine against it). The test hook's extra configs are
    not counted, so they show DeepEP's own buffer-size rejection."""
    extra = set(extra_configs(space.decl))
    configs = [(op, c) for op in OPS for c in space.configs(op) if (op, c) not in extra]
    configs += [(op, c) for op, c in baseline_configs(world, space.sms_values()) if c.num_sms <= sms_cap]
    return align(max([nvl_bytes(op, c, world, w) for op, c in configs] + [0]))
