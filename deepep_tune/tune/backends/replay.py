"""Replay: answer each measurement from a recorded landscape, so searches can be compared offline."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from typing import Any, Sequence

from ...deepep.workload import Workload
from ...knobs import Knobs, KnobSpace, Space
from ...record.log import LogError, read_landscape
from .base import OBJECTIVE_PARTS, Backend, LocalResult


class ReplayBackend(Backend):
    name = "replay"

    def __init__(self, path: str, decl: KnobSpace, noise: float = 0.0, seed: int = 0, objective: str = "train",
                 call_noise: Sequence[float] | None = None) -> None:
        """noise: one relative draw per measurement (every iteration alike). call_noise: relative deviations to draw
        from for every single call instead (a measured distribution), so a short pass is as noisy as it would be
        on the GPU; modelled_us then adds up the GPU time of every call, warm-up included."""
        self.path, self.noise, self.seed, self.objective = path, noise, seed, objective
        self.call_noise = list(call_noise) if call_noise else None
        self.modelled_us = 0.0
        self.knob_space = decl
        self.records = read_landscape(path, decl)
        self.calls: Counter[tuple[str, Knobs]] = Counter()
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

    def reused(self, op: str, cfg: Knobs) -> None:
        """A resumed run took this answer from its log: count it, so later draws match an uninterrupted run."""
        self.calls[(op, cfg)] += 1

    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        key = (op, cfg)
        if key not in self.times:
            raise KeyError(f"replay landscape {self.path} has no {op} measurement at {cfg}")
        parts = dict(self.times[key])
        if any(math.isinf(t) for t in parts.values()):
            raise RuntimeError(f"{op} at {cfg} failed when the landscape was recorded")
        self.calls[key] += 1
        self.modelled_us += (warmup + iters) * sum(parts.values())
        if self.call_noise:
            rng = random.Random(hashlib.sha256(f"{self.seed}|{op}|{cfg}|{self.calls[key]}|calls".encode()).digest())
            return LocalResult({n: [t * (1.0 + rng.choice(self.call_noise)) for _ in range(iters)]
                                for n, t in parts.items()})
        if self.noise:
            # Seeded by the point and its call count: identical on every rank, different per repeat.
            digest = hashlib.sha256(f"{self.seed}|{op}|{cfg}|{self.calls[key]}".encode()).digest()
            factor = 1.0 + self.noise * random.Random(digest).gauss(0.0, 1.0)
            parts = {n: t * factor for n, t in parts.items()}
        # one answer per measurement; the reduction expects `iters` samples per part
        return LocalResult({n: [t] * iters for n, t in parts.items()})

    def describe(self) -> dict[str, Any]:
        return {"device_name": f"replay of {self.path}", "colocated": False, "num_devices": 0, "device_sms": None,
                "replay_noise": self.noise}


def hardware_sms_cap(o: Any, ranks: Any) -> int | None:
    return None  # a landscape has no hardware: only --max-sms limits it


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int | None) -> tuple[Backend, Space, int]:
    b = ReplayBackend(o.measurement.replay or "", decl, o.measurement.replay_noise, o.shape.seed, o.search.objective)
    b.use(o.shape)
    return b, b.space().restrict(sms_cap), 0
