#!/usr/bin/env python3
"""How close each search mode gets to the optimum, and at what cost, on recorded landscapes, with and without
racing (tune/race.py).

    python3 benchmarks/search_benchmark.py benchmarks/landscapes/*.jsonl [--seeds 8] [--noise 0.02]

For each landscape, objective (train needs a landscape with backward parts: a log recorded with --objective
train; forward replays any), mode and racing on/off:
- measurements spent (short passes, baselines and re-measurements included) and the modelled GPU time: every
  call the run would make (warm-up included) times the config's recorded time, replayed call by call with
  per-call noise drawn from the measured distribution (below);
- regret = (true dispatch + combine time of the pick) / (optimum) - 1, where the optimum is the best
  (num_sms, dispatch, combine) of the whole landscape under the coupling rule: exact replay (no noise), and the
  worst and mean over --seeds seeds of --noise relative noise per call (normal, the replay backend's model).
  The replay draws every config's calls from one stream per (seed, config), so racing's short pass and its
  continuation see the very calls a run without racing sees: the columns differ only by what racing decides.

Per-call noise: the committed H100 NVLink logs record, per measurement, the fastest and the slowest of its
iterations on any rank around the median (min_us, max_us, time_us). A 10-iteration, 2-rank measurement holds
20 samples, so each call's relative deviation is drawn from those logs' (min/median - 1) with probability 1/20,
(max/median - 1) with 1/20, and 0 otherwise: the same spread and the same outliers per measurement as seen."""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tabulate import tabulate  # noqa: E402

from deepep_tune.deepep.config import V1  # noqa: E402
from deepep_tune.record.log import LogError  # noqa: E402
from deepep_tune.tune.backends.replay import ReplayBackend  # noqa: E402
from deepep_tune.tune.measure import MeasureSettings, Measurer  # noqa: E402
from deepep_tune.tune.race import RaceSettings  # noqa: E402
from deepep_tune.tune.search import per_sms_table, pick, search_and_baselines  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(ROOT, "results", "h100-nvlink", "*", "logs", "*.jsonl")
WARMUP, ITERS = 2, 10  # the tuner's defaults
MARGIN = float(os.environ.get("RACE_MARGIN", "0.10"))  # --race-margin


def call_noise(pattern: str = LOGS, seed: int = 0) -> list[float]:
    """A pool of per-call relative deviations, built from the logs as the module docstring says."""
    devs: list[float] = []
    for path in sorted(glob.glob(pattern)):
        for line in open(path):
            r = json.loads(line)
            t, lo, hi = r.get("time_us"), r.get("min_us"), r.get("max_us")
            if r.get("role") == "search" and t and lo and hi:
                devs += [lo / t - 1, hi / t - 1] + [0.0] * 18
    random.Random(seed).shuffle(devs)
    return devs


def ep_size_of(path: str) -> int:
    with open(path) as f:
        head = json.loads(f.readline())
    return int(head.get("ep_size", 4))


def run_one(path: str, objective: str, mode: str, race: bool, noise: float, seed: int,
            calls: list[float] | None) -> dict:
    backend = ReplayBackend(path, V1, noise, seed, objective, call_noise=calls)
    space = backend.space()
    truth = {k: [backend.time_of(*k)] for k in backend.times}
    opt = pick(per_sms_table(truth, space))
    settings = MeasureSettings(WARMUP, ITERS, race=RaceSettings(3 if race else 0, 1, MARGIN))
    meas = Measurer(backend, settings, rank=0, log=None)
    best, _, _ = search_and_baselines(meas, space, mode, ep_size_of(path), None, None)
    true_total = backend.time_of("dispatch", best.dispatch) + backend.time_of("combine", best.combine)
    return {"measurements": len(meas.records), "gpu_s": backend.modelled_us / 1e6,
            "regret": true_total / opt.total_us - 1}


def rows_for(path: str, objective: str, seeds: int, noise: float, calls: list[float]) -> list[list]:
    rows = []
    for mode in ("full", "quick"):
        for race in (False, True):
            cost = run_one(path, objective, mode, race, 0.0, 0, calls)
            exact = run_one(path, objective, mode, race, 0.0, 0, None)
            noisy = [run_one(path, objective, mode, race, noise, s, None) for s in range(seeds)]
            rows.append([os.path.basename(path), objective, mode, "on" if race else "off", cost["measurements"],
                         f"{cost['gpu_s']:.1f}", f"{100 * exact['regret']:.2f}%",
                         f"{100 * max(r['regret'] for r in noisy):.2f}%",
                         f"{100 * sum(r['regret'] for r in noisy) / len(noisy):.2f}%"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("landscapes", nargs="+")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.02)
    a = ap.parse_args()
    calls = call_noise()
    rows = []
    for path in a.landscapes:
        for objective in ("train", "forward"):
            try:
                ReplayBackend(path, V1, objective=objective)
            except LogError:
                continue  # a forward-only landscape
            rows += rows_for(path, objective, a.seeds, a.noise, calls)
    print(f"per-call noise pool: {len(calls)} draws from {LOGS}")
    print(tabulate(rows, headers=["landscape", "objective", "mode", "racing", "measurements", "GPU s (modelled)",
                                  "regret exact", f"worst regret {a.noise:.0%}", f"mean regret {a.noise:.0%}"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
