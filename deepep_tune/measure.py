"""The Oracle the search talks to: runs one measurement on every rank in lockstep, guards it with a
watchdog, reduces it across ranks, logs it, and replays measurements a resumed run already has."""

from __future__ import annotations

import faulthandler
import math
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from .backends.base import Backend
from .bench import reduce_samples
from .faults import maybe_inject
from .logio import LogWriter, measurement_key
from .search import mean_times
from .space import TuneConfig


class ContextLost(RuntimeError):
    """The device is unusable after a failed measurement: the process must restart (and resume)."""


@dataclass
class MeasureSettings:
    warmup: int
    iters: int
    remeasure_factor: int = 3
    timeout_s: float = 60.0


@dataclass
class Sequence:
    """Numbers the measurements of a run (shared by the Measurers of several token counts)."""

    last: int = 0

    def next(self) -> int:
        self.last += 1
        return self.last


class Measurer:
    def __init__(self, backend: Backend, settings: MeasureSettings, rank: int, log: LogWriter | None,
                 prior: list[dict[str, Any]] | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
                 healthy: Callable[[], bool] | None = None, tag: dict[str, Any] | None = None,
                 seq: Sequence | None = None) -> None:
        self.backend, self.settings, self.rank, self.log = backend, settings, rank, log
        self.prior: dict[tuple[str, TuneConfig], list[dict[str, Any]]] = defaultdict(list)
        for rec in prior or []:
            self.prior[measurement_key(rec)].append(rec)
        self.requests: Counter[tuple[str, TuneConfig]] = Counter()
        self.obs: dict[tuple[str, TuneConfig], list[float]] = defaultdict(list)
        self.records: list[dict[str, Any]] = []
        self.reused = 0
        self.tag = tag or {}
        self.seq = seq or Sequence(max((r.get("seq", 0) for r in prior or []), default=0))
        self.on_record = on_record
        self.healthy = healthy

    # Oracle interface -------------------------------------------------------------------------
    def time(self, op: str, cfg: TuneConfig) -> float:
        if not self.obs.get((op, cfg)):
            self._take(op, cfg, "search", self.settings.iters)
        return mean_times({(op, cfg): self.obs[(op, cfg)]})[(op, cfg)]

    def remeasure(self, op: str, cfg: TuneConfig) -> float:
        self._take(op, cfg, "remeasure", self.settings.iters * self.settings.remeasure_factor)
        return mean_times({(op, cfg): self.obs[(op, cfg)]})[(op, cfg)]

    def observed(self) -> dict[tuple[str, TuneConfig], list[float]]:
        return self.obs

    # ------------------------------------------------------------------------------------------
    def _take(self, op: str, cfg: TuneConfig, role: str, iters: int) -> None:
        key = (op, cfg)
        n = self.requests[key]
        self.requests[key] += 1
        if n < len(self.prior[key]):
            rec = self.prior[key][n]
            self.reused += 1
            note = getattr(self.backend, "reused", None)  # replay: keep its noise sequence as if measured
            if note is not None:
                note(op, cfg)
        else:
            rec = self._run(op, cfg, role, iters)
        self.records.append(rec)
        t = rec.get("time_us")
        self.obs[key].append(float(t) if rec.get("status") == "ok" and t is not None else math.inf)
        if self.on_record:
            self.on_record(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(rec)

    def _run(self, op: str, cfg: TuneConfig, role: str, iters: int) -> dict[str, Any]:
        seq = self.seq.next()
        self._write({"event": "start", "seq": seq, "measure": {"op": op, **cfg.as_dict(), "role": role, **self.tag},
                     "t": time.time()})
        # The watchdog runs in a C thread, so it fires even while a kernel or a collective holds the GIL.
        faulthandler.dump_traceback_later(self.settings.timeout_s, exit=True)
        error, samples, status = None, [], "ok"
        try:
            maybe_inject(op, cfg, self.rank)
            res = self.backend.measure(op, cfg, self.settings.warmup, iters)
            samples = res.samples_us
            if res.error:
                status, error = "wrong", res.error
        except Exception as e:  # noqa: BLE001 - any failure of a config is data, not a crash
            status, error = "error", f"{type(e).__name__}: {e}".strip()
            if not str(e):
                error += " " + traceback.format_exc(limit=1)
        lost = status == "error" and self.healthy is not None and not self.healthy()
        red = reduce_samples(samples, status != "ok", iters)
        faulthandler.cancel_dump_traceback_later()
        if red.failed_ranks and dist.is_initialized():
            # Every rank learns every rank's outcome, so all of them record it and, if one GPU is unusable,
            # all of them stop together (a rank left running would start the next config and wait forever).
            errors: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, (status, error, lost))
            failed = [(r, s, e) for r, (s, e, _) in enumerate(errors) if s != "ok"]
            status = "error" if any(s == "error" for _, s, _ in failed) else "wrong"
            error = "; ".join(f"rank {r}: {e}" for r, _, e in failed)
            lost = any(x[2] for x in errors)
        rec = {
            "op": op, **cfg.as_dict(), **self.tag,
            "time_us": red.time_us if status == "ok" else None,
            "median_us": _finite(red.time_us), "max_rank_median_us": _finite(red.max_rank_median_us),
            "min_us": _finite(red.min_us), "max_us": _finite(red.max_us),
            "rank0_median_us": _finite(red.rank0_median_us),
            "iters": iters, "status": status, "error": error, "role": role, "seq": seq, "t": time.time(),
        }
        self._write(rec)
        if lost:
            raise ContextLost(f"{op} at {cfg} left the GPU unusable ({error}); restart with --resume")
        return rec


def crashed_record(measure: dict[str, Any], seq: int, error: str) -> dict[str, Any]:
    """The measurement line for a config whose measurement never finished (a rank died or hung)."""
    return {**{k: v for k, v in measure.items() if k != "role"}, "time_us": None, "median_us": None,
            "max_rank_median_us": None, "min_us": None, "max_us": None, "rank0_median_us": None, "iters": None,
            "status": "crashed", "error": error, "role": measure.get("role"), "seq": seq, "t": time.time()}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
