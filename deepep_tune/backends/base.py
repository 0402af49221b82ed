"""What every backend provides, and the shared dispatch/combine harness of the two that move real tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..bench import Timer, bench
from ..check import check_combine, check_dispatch
from ..space import TuneConfig
from ..routing import Expected, Routing, expected_for_rank, make_routing, token_values
from ..workload import Workload


@dataclass
class LocalResult:
    """One rank's view of one measurement."""

    samples_us: list[float]
    error: str | None = None  # check failure: the config ran but produced a wrong result


class Backend(ABC):
    name: str

    @abstractmethod
    def measure(self, op: str, cfg: TuneConfig, warmup: int, iters: int) -> LocalResult:
        """Time op at cfg on this rank. May raise: the caller records the exception as a failed config."""

    def prepare(self, workload: Workload) -> None:
        """Switch to another workload (another token count); the communication buffer is kept."""

    def describe(self) -> dict[str, Any]:
        """Hardware and software facts for the results file."""
        return {}

    def close(self) -> None:
        pass


@dataclass
class DispatchOut:
    recv_x: Any  # tensor [N, H]
    recv_scales: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    num_recv_per_expert: list[int] | None
    handle: Any


@dataclass
class CombineOut:
    combined_x: Any
    combined_weights: Any


class TokenBackend(Backend):
    """Runs real dispatch/combine through `_dispatch`/`_combine` and checks every measured config.
    A combine needs a handle from a dispatch at the same num_sms; the last one per num_sms is kept."""

    timer: Timer

    def __init__(self, rank: int, num_ranks: int) -> None:
        self.rank, self.num_ranks = rank, num_ranks

    def prepare(self, workload: Workload) -> None:
        self.workload = workload
        routings = [make_routing(workload, r, self.num_ranks) for r in range(self.num_ranks)]
        self.routing: Routing = routings[self.rank]
        self.expected: Expected = expected_for_rank(workload, self.rank, self.num_ranks, routings)
        self.own_values = token_values(self.rank, workload.num_tokens).float()
        self.handles: dict[int, Any] = {}

    def flush(self) -> None:
        """Runs before every timed iteration, outside the timing."""

    @abstractmethod
    def _dispatch(self, cfg: TuneConfig) -> DispatchOut: ...

    @abstractmethod
    def _combine(self, cfg: TuneConfig, handle: Any) -> CombineOut: ...

    def _timed(self, call: Callable[[], Any], warmup: int, iters: int) -> tuple[list[float], Any]:
        out: list[Any] = [None]

        def run() -> None:
            out[0] = call()

        samples = bench(run, warmup=warmup, iters=iters, timer=self.timer, before_each=self.flush)
        return samples, out[0]

    def measure(self, op: str, cfg: TuneConfig, warmup: int, iters: int) -> LocalResult:
        if op == "dispatch":
            samples, out = self._timed(lambda: self._dispatch(cfg), warmup, iters)
            err = check_dispatch(self.expected, out.recv_x, out.recv_scales, out.recv_topk_idx,
                                 out.recv_topk_weights, out.num_recv_per_expert)
            if err is None:  # a wrong dispatch's handle would make later combines look wrong too
                self.handles[cfg.num_sms] = out.handle
            return LocalResult(samples, err)
        handle = self.handles.get(cfg.num_sms)
        if handle is None:
            # Untimed dispatch for a handle: the smallest-footprint config at this num_sms.
            handle = self._dispatch(TuneConfig(cfg.num_sms, 4, 128)).handle
            self.handles[cfg.num_sms] = handle
        samples, out = self._timed(lambda: self._combine(cfg, handle), warmup, iters)
        err = check_combine(self.expected, out.combined_x, self.own_values, out.combined_weights,
                            self.routing.topk_weights)
        return LocalResult(samples, err)
