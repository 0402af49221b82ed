"""Replay: answer each measurement from a recorded landscape, so searches can be compared offline."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any, Sequence

from ...deepep.workload import Workload
from ...knobs import Knobs, KnobSpace, Space
from ...record.log import LogError, read_landscape
from .base import OBJECTIVE_PARTS, Backend, LocalResult


class ReplayBackend(Backend):
    name = "replay"

    def __init__(self, path: str, decl: KnobSpace, noise: float = 0.0, seed: int = 0, objective: str = "train",
                 call_noise: Sequence[float] | None = None) -> None:
        """Every timed call gets its own relative deviation: a normal draw with standard deviation `noise`, or, with
        call_noise, a draw from those measured deviations. The draws of a config form one stream seeded by (seed, op,
        config), so its k-th call deviates alike whether it ran in one pass or in a short pass and its
        continuation, with or without a resume in between: search modes compare on common random numbers.
        modelled_us adds up the GPU time of every call, warm-up included."""
        self.path, self.noise, self.seed, self.objective = path, noise, seed, objective
        self.call_noise = list(call_noise) if call_noise else None
        self.modelled_us = 0.0
        self.knob_space = decl
        self.records = read_landscape(path, decl)
        self.streams: dict[tuple[str, Knobs], random.Random] = {}
        self.prepare(None)

    def prepare(self, workload: Workload | None) -> None:
        """Records that name a num_tokens answer only for that token count."""
        self.times: dict[tuple[str, Knobs], dict[str, float]] = {}
        for rec in self.records:
            if workload is not None and rec.get("num_tokens", workload.num_tokens) != workload.num_tokens:
                continue
            key = self.knob_space.key_of(rec)
            if key in self.times:
                continue
            ok = rec.get("status", "ok") == "ok" and isinstance(rec.get("time_us"), (int, float))
            parts = rec.get("parts_us") or {key[0]: rec.get("time_us")}
            names = OBJECTIVE_PARTS[self.objective][key[0]]
            if ok and any(not isinstance(parts.get(n), (int, float)) for n in names):
                raise LogError(f"{self.path} has no {'/'.join(names)} times for {key[0]} (recorded with "
                               f"--objective forward?): replay it with --objective forward")
            self.times[key] = {n: float(parts[n]) if ok else math.inf for n in names}

    def space(self) -> Space:
        return self.knob_space.space_of(self.times)

    def can_measure(self, op: str, cfg: Knobs) -> bool:
        return (op, cfg) in self.times

    def time_of(self, op: str, cfg: Knobs) -> float:
        """The recorded (noise-free) time of op at cfg under this objective."""
        return sum(self.times[(op, cfg)].values())

    def reused(self, op: str, cfg: Knobs, iters: int) -> None:
        """A resumed run took this answer from its log: draw past its calls, so later draws match an uninterrupted
        run."""
        if (op, cfg) in self.times:
            self._deviations(op, cfg, iters)

    def _deviations(self, op: str, cfg: Knobs, iters: int) -> list[list[float]]:
        """The next `iters` calls' relative deviations, one per part per call."""
        parts = len(self.times[(op, cfg)])
        if not (self.noise or self.call_noise):
            return [[0.0] * parts for _ in range(iters)]
        rng = self.streams.get((op, cfg))
        if rng is None:
            rng = self.streams[(op, cfg)] = random.Random(hashlib.sha256(f"{self.seed}|{op}|{cfg}".encode()).digest())
        pool = self.call_noise
        return [[rng.choice(pool) if pool else self.noise * rng.gauss(0.0, 1.0) for _ in range(parts)]
                for _ in range(iters)]

    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        key = (op, cfg)
        if key not in self.times:
            raise KeyError(f"replay landscape {self.path} has no {op} measurement at {cfg}")
        parts = dict(self.times[key])
        if any(math.isinf(t) for t in parts.values()):
            raise RuntimeError(f"{op} at {cfg} failed when the landscape was recorded")
        self.modelled_us += (warmup + iters) * sum(parts.values())
        devs = self._deviations(op, cfg, iters)
        return LocalResult({n: [t * (1.0 + d[i]) for d in devs] for i, (n, t) in enumerate(parts.items())})

    def describe(self) -> dict[str, Any]:
        return {"device_name": f"replay of {self.path}", "colocated": False, "num_devices": 0, "device_sms": None,
                "replay_noise": self.noise}


def hardware_sms_cap(o: Any, ranks: Any) -> int | None:
    return None  # a landscape has no hardware: only --max-sms limits it


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int | None) -> tuple[Backend, Space, int]:
    b = ReplayBackend(o.measurement.replay or "", decl, o.measurement.replay_noise, o.shape.seed, o.search.objective)
    b.use(o.shape)
    return b, b.space().restrict(sms_cap), 0
