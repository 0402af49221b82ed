"""The Oracle the search talks to: runs one measurement on every rank in lockstep, guards it with a
watchdog, reduces it across ranks, logs it, and replays measurements a resumed run already has."""

from __future__ import annotations

import faulthandler
import itertools
import math
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Callable, Iterator

import torch.distributed as dist

from ..deepep.workload import Workload
from ..knobs import Knobs, KnobSpace
from ..record.log import LogWriter
from ..stats import mean_times
from .backends.base import Backend
from .faults import maybe_inject
from .race import Race, RaceSettings
from .timing import Reduced, reduce_samples

Key = tuple[str, Knobs]


class ContextLost(RuntimeError):
    """The device is unusable after a failed measurement: the process must restart (and resume)."""


@dataclass
class MeasureSettings:
    warmup: int
    iters: int
    remeasure_factor: int = 3
    timeout_s: float = 60.0
    race: RaceSettings = field(default_factory=lambda: RaceSettings(iters=0))  # off unless the run asks


def measurement_record(op: str, cfg: Knobs, tag: dict[str, Any], red: Reduced | None, iters: int | None,
                       status: str, error: str | None, role: str | None, seq: int,
                       extends: dict[str, int] | None = None) -> dict[str, Any]:
    """One log line per measurement, the only place its layout is written (red=None: it never finished). A short
    pass keeps its iterations (samples_us), so that its continuation, here or in a resumed run, can count them;
    a continuation names the pass it extends, and its time and iters cover both passes."""
    def finite(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    rec = {
        "op": op, **cfg.as_dict(), **tag,
        "time_us": finite(red.time_us) if red is not None and status == "ok" else None,
        "median_us": finite(red and red.time_us), "max_rank_median_us": finite(red and red.max_rank_median_us),
        "min_us": finite(red and red.min_us), "max_us": finite(red and red.max_us),
        "rank0_median_us": finite(red and red.rank0_median_us),
        "iters": iters, "status": status, "error": error, "role": role, "seq": seq, "t": time.time(),
    }
    if red is not None and len(red.parts_us) > 1:
        rec["parts_us"] = {k: finite(v) for k, v in red.parts_us.items()}
    if red is not None and role == "short" and status == "ok":
        rec["samples_us"] = {k: [round(x, 3) for x in v] for k, v in red.samples_us.items()}
    if extends:
        rec["extends"] = extends
    return rec


def short_iterations(short: dict[str, Any]) -> int:
    """Iterations a short pass kept in its record (0 for a log from before continuations existed)."""
    samples = short.get("samples_us")
    return len(next(iter(samples.values()))) if samples else 0


def new_iterations(rec: dict[str, Any]) -> int:
    """Iterations a record's measurement ran itself (a continuation's iters include the pass it extends)."""
    return int(rec.get("iters") or 0) - int((rec.get("extends") or {}).get("iters", 0))


def crashed_record(measure: dict[str, Any], seq: int, error: str, decl: KnobSpace) -> dict[str, Any]:
    """The measurement line for a config whose measurement never finished (a rank died or hung)."""
    op, cfg = decl.key_of(measure)
    tag = {k: v for k, v in measure.items() if k not in ("op", "role", *cfg.names)}
    return measurement_record(op, cfg, tag, None, None, "crashed", error, measure.get("role"), seq)


class Measurer:
    """Answers time(op, cfg) for one workload (token count) of one backend: it owns that workload and switches
    the backend to it before measuring. `seq` numbers the measurements of a run and is shared by the Measurers
    of its token counts."""

    def __init__(self, backend: Backend, settings: MeasureSettings, rank: int, log: LogWriter | None,
                 prior: list[dict[str, Any]] | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
                 tag: dict[str, Any] | None = None, seq: Iterator[int] | None = None,
                 workload: Workload | None = None) -> None:
        self.backend, self.settings, self.rank, self.log = backend, settings, rank, log
        self.workload = workload
        self.decl = backend.knob_space
        self.prior: dict[Key, list[dict[str, Any]]] = defaultdict(list)
        for rec in prior or []:
            self.prior[self.decl.key_of(rec)].append(rec)
        self.requests: Counter[Key] = Counter()
        self.obs: dict[Key, list[float]] = defaultdict(list)
        self.records: list[dict[str, Any]] = []
        self.reused = 0
        self.tag = tag or {}
        self.seq = seq or itertools.count(max((r.get("seq", 0) for r in prior or []), default=0) + 1)
        self.on_record = on_record
        self.race = Race(settings.race)
        self.short_only: dict[Key, dict[str, Any]] = {}  # configs whose only observation is their short pass

    # Oracle interface -------------------------------------------------------------------------
    def time(self, op: str, cfg: Knobs) -> float:
        key = (op, cfg)
        if not self.obs.get(key):
            race = self.settings.race
            if not race.on:
                self._take(op, cfg, "search", self.settings.iters)
            else:
                rec = self._take(op, cfg, "short", race.iters, race.warmup)
                short = self._value(rec)
                if self.race.deserves_full(op, short):
                    # right after its short pass, with warm kernels: the full count continues that pass
                    self._extend(op, cfg, rec, warmup=0)
                else:  # cannot win (or failed, which is final): its short pass stands for it
                    self.obs[key].append(short)
                    if math.isfinite(short):
                        self.short_only[key] = rec
        return mean_times({key: self.obs[key]})[key]

    def is_short(self, op: str, cfg: Knobs) -> bool:
        """Only a short pass measured this config (racing decided it could not win)."""
        return (op, cfg) in self.short_only

    def promote(self, op: str, cfg: Knobs) -> float:
        """The full count for a config that only had a short pass (it turned out to be a row's best)."""
        key = (op, cfg)
        if key in self.short_only:
            short = self.short_only.pop(key)
            self.obs[key].clear()
            self._extend(op, cfg, short, warmup=self.settings.warmup)  # other configs ran since: warm it again
        return mean_times({key: self.obs[key]})[key]

    def _extend(self, op: str, cfg: Knobs, short: dict[str, Any], warmup: int) -> dict[str, Any]:
        """The rest of the full count after a short pass, its time taken over both passes' iterations (a log from
        before continuations existed keeps no iterations: then a whole full pass)."""
        done = short_iterations(short)
        if not done or done >= self.settings.iters:
            return self._take(op, cfg, "search", self.settings.iters)
        return self._take(op, cfg, "search", self.settings.iters - done, warmup, short)

    def remeasure(self, op: str, cfg: Knobs) -> float:
        self.promote(op, cfg)  # a short pass never averages with full ones
        self._take(op, cfg, "remeasure", self.settings.iters * self.settings.remeasure_factor)
        return mean_times({(op, cfg): self.obs[(op, cfg)]})[(op, cfg)]

    def observed(self) -> dict[Key, list[float]]:
        return self.obs

    def can_measure(self, op: str, cfg: Knobs) -> bool:
        return self.backend.can_measure(op, cfg)

    def parts_of(self, op: str, cfg: Knobs) -> dict[str, float]:
        """Mean time of each part of op at cfg over its good measurements (search and re-measurements)."""
        recs = [r for r in self.records if self.decl.key_of(r) == (op, cfg) and r.get("status") == "ok"
                and r.get("role") in ("search", "remeasure", None)]
        parts = [r.get("parts_us") or {op: r["time_us"]} for r in recs]
        return {k: round(fmean(p[k] for p in parts), 2) for k in parts[0]} if parts else {}

    # ------------------------------------------------------------------------------------------
    def sample(self, op: str, cfg: Knobs, role: str) -> float:
        """One more measurement kept out of the search's observations (the final re-timing); inf if it failed."""
        return self._value(self._take(op, cfg, role, self.settings.iters))

    @staticmethod
    def _value(rec: dict[str, Any]) -> float:
        return float(rec["time_us"]) if rec.get("status") == "ok" and rec.get("time_us") is not None else math.inf

    def _take(self, op: str, cfg: Knobs, role: str, iters: int, warmup: int | None = None,
              short: dict[str, Any] | None = None) -> dict[str, Any]:
        key = (op, cfg)
        n = self.requests[key]
        self.requests[key] += 1
        if n < len(self.prior[key]):
            rec = self.prior[key][n]
            self.reused += 1
            self.backend.reused(op, cfg, new_iterations(rec))
        else:
            rec = self._run(op, cfg, role, iters, self.settings.warmup if warmup is None else warmup, short)
        self.records.append(rec)
        if role in ("search", "remeasure"):
            self.obs[key].append(self._value(rec))
        if role == "search":
            self.race.measured_full(op, self._value(rec))
        if self.on_record:
            self.on_record(rec)
        return rec

    def _write(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(rec)

    def _run(self, op: str, cfg: Knobs, role: str, iters: int, warmup: int,
             short: dict[str, Any] | None = None) -> dict[str, Any]:
        """One measurement; with `short`, the continuation of that short pass's record."""
        if self.workload is not None:
            self.backend.use(self.workload)
        seq = next(self.seq)
        self._write({"event": "start", "seq": seq, "measure": {"op": op, **cfg.as_dict(), "role": role, **self.tag},
                     "t": time.time()})
        # The watchdog runs in a C thread, so it fires even while a kernel or a collective holds the GIL.
        faulthandler.dump_traceback_later(self.settings.timeout_s, exit=True)
        error, parts, status = None, {}, "ok"
        try:
            maybe_inject(op, cfg, self.rank)
            res = self.backend.measure(op, cfg, warmup, iters)
            parts = res.parts
            if res.error:
                status, error = "wrong", res.error
        except Exception as e:  # noqa: BLE001 - any failure of a config is data, not a crash
            status, error = "error", f"{type(e).__name__}: {e}".strip()
            if not str(e):
                error += " " + traceback.format_exc(limit=1)
        lost = status == "error" and not self.backend.healthy()
        red = reduce_samples(parts, self.backend.parts(op), status != "ok", iters)
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
        extends = None
        if short is not None and status == "ok":
            extends = {"seq": int(short["seq"]), "iters": short_iterations(short)}
            red, iters = red.after(short["samples_us"]), iters + extends["iters"]
        rec = measurement_record(op, cfg, self.tag, red, iters, status, error, role, seq, extends)
        self._write(rec)
        if lost:
            raise ContextLost(f"{op} at {cfg} left the GPU unusable ({error}); restart with --resume")
        return rec
