"""Shared helpers for the test suite (imported by the test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from typing import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SUBPROCESS_TIMEOUT = 240

from deepep_tune.deepep.config import grid  # noqa: E402
from deepep_tune.tune.backends.reference import REFERENCE_SMS_CAP  # noqa: E402

# The grid the tuner sweeps on a small GPU (and the one the reference backend uses).
_GRID = grid(REFERENCE_SMS_CAP)
SMS, BUFFERS = _GRID["dispatch"]["num_sms"], _GRID["dispatch"]["nvl_buffer"]
DISPATCH_CHUNKS, COMBINE_CHUNKS = _GRID["dispatch"]["nvl_chunk"], _GRID["combine"]["nvl_chunk"]

TimeFn = Callable[[str, int, int, int], float]


def grid_points(sms: Iterable[int] = SMS, dchunks: Iterable[int] = DISPATCH_CHUNKS,
                cchunks: Iterable[int] = COMBINE_CHUNKS, buffers: Iterable[int] = BUFFERS):
    """(op, num_sms, nvl_chunk, nvl_buffer) for every point of the grid."""
    sms, buffers = tuple(sms), tuple(buffers)
    for op, chunks in (("dispatch", tuple(dchunks)), ("combine", tuple(cchunks))):
        for s, c, b in itertools.product(sms, chunks, buffers):
            yield op, s, c, b


BACKWARD_PART = {"dispatch": "cached_dispatch", "combine": "combine_bwd"}


def write_landscape(path, fn: TimeFn, points=None, parts: bool = True) -> dict[tuple[str, int, int, int], float]:
    """Write a plain JSONL landscape; returns {(op, num_sms, chunk, buffer): time_us}. With parts, each line
    also splits time_us evenly into the forward call and its backward counterpart (what --objective train
    times), so both objectives replay it and rank the configs alike."""
    truth = {}
    with open(path, "w") as f:
        for op, s, c, b in (points if points is not None else grid_points()):
            t = float(fn(op, s, c, b))
            truth[(op, s, c, b)] = t
            rec = {"op": op, "num_sms": s, "nvl_chunk": c, "nvl_buffer": b, "time_us": t}
            if parts:
                rec["parts_us"] = {op: t / 2, BACKWARD_PART[op]: t / 2}
            f.write(json.dumps(rec) + "\n")
    return truth


def brute_force_optimum(truth: dict[tuple[str, int, int, int], float], max_sms: int | None = None):
    """Independent optimum under the coupling rule: one num_sms, best dispatch and best combine there,
    minimising their sum. Returns (num_sms, dispatch_key, combine_key, total)."""
    best = None
    for s in sorted({k[1] for k in truth}):
        if max_sms is not None and s > max_sms:
            continue
        per_op = {}
        for op in ("dispatch", "combine"):
            cands = [(t, k) for k, t in truth.items() if k[0] == op and k[1] == s and math.isfinite(t)]
            if not cands:
                break
            per_op[op] = min(cands)
        else:
            total = per_op["dispatch"][0] + per_op["combine"][0]
            if best is None or total < best[3]:
                best = (s, per_op["dispatch"][1], per_op["combine"][1], total)
    return best


def bowl(s0: float, d_opt: tuple[float, float], c_opt: tuple[float, float], jitter_seed: int | None = None,
         sms=SMS, dchunks=DISPATCH_CHUNKS, cchunks=COMBINE_CHUNKS, buffers=BUFFERS) -> TimeFn:
    """A smooth convex bowl over grid indices with a unique minimum (tiny deterministic tie-breaking jitter)."""
    import random
    rnd = random.Random(jitter_seed)
    jitter: dict = {}

    def fn(op: str, s: int, c: int, b: int) -> float:
        si = sms.index(s)
        ci = (dchunks if op == "dispatch" else cchunks).index(c)
        bi = buffers.index(b)
        ct, bt = d_opt if op == "dispatch" else c_opt
        key = (op, s, c, b)
        if key not in jitter:
            jitter[key] = rnd.random() * 1e-3 if jitter_seed is not None else 0.0
        return (100.0 + (0.0 if op == "dispatch" else 20.0) + 3.0 * (si - s0) ** 2 + 2.0 * (ci - ct) ** 2
                + 5.0 * (bi - bt) ** 2 + jitter[key])

    return fn


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    # run.sh's launcher prefers a torchrun on PATH: make it the one of this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("DEEPEP_TUNE_INJECT", None)
    env.update(extra)
    return env


def run_launch(args: list[str], env_extra: dict[str, str] | None = None, via_run_sh: bool = False):
    """python3 -m deepep_tune ARGS (or ./run.sh ARGS) from the repository root."""
    cmd = [os.path.join(ROOT, "run.sh"), *args] if via_run_sh else [sys.executable, "-m", "deepep_tune", *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**(env_extra or {})), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
