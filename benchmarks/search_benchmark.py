#!/usr/bin/env python3
"""How close each search mode gets to the optimum, and at what cost, on recorded landscapes.

    python3 benchmarks/search_benchmark.py benchmarks/landscapes/*.jsonl [--seeds 5] [--noise 0.02]

For each landscape, objective (train needs a landscape with backward parts: a log recorded with
--objective train; forward replays any) and mode: measurements spent (baselines and re-measurements included), wall time,
the chosen config, and regret = (true dispatch + combine time of the pick) / (optimum) - 1, where the
optimum is the best (num_sms, dispatch config, combine config) of the whole landscape under the
coupling rule. Runs the real search, noise guard and baselines through the replay backend on CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tabulate import tabulate  # noqa: E402

from deepep_tune.deepep.config import V1
from deepep_tune.record.log import LogError  # noqa: E402
from deepep_tune.tune.backends.replay import ReplayBackend  # noqa: E402
from deepep_tune.tune.measure import Measurer, MeasureSettings  # noqa: E402
from deepep_tune.tune.search import per_sms_table, pick, search_and_baselines  # noqa: E402


def ep_size_of(path: str) -> int:
    with open(path) as f:
        head = json.loads(f.readline())
    return int(head.get("ep_size", 4))


def run_one(path: str, objective: str, mode: str, noise: float, seed: int) -> dict:
    backend = ReplayBackend(path, V1, noise, seed, objective)
    space = backend.space()
    truth = {k: [backend.time_of(*k)] for k in backend.times}
    opt = pick(per_sms_table(truth, space))
    meas = Measurer(backend, MeasureSettings(warmup=0, iters=1), rank=0, log=None)
    t0 = time.perf_counter()
    best, _, _ = search_and_baselines(meas, space, mode, ep_size_of(path), None, None)
    wall = time.perf_counter() - t0
    true_total = backend.time_of("dispatch", best.dispatch) + backend.time_of("combine", best.combine)
    return {"measurements": len(meas.records), "space": space.size(), "wall_s": wall,
            "pick": f"{best.num_sms} d{best.dispatch.nvl_chunk}/{best.dispatch.nvl_buffer} "
                    f"c{best.combine.nvl_chunk}/{best.combine.nvl_buffer}",
            "regret": true_total / opt.total_us - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("landscapes", nargs="+")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.02)
    a = ap.parse_args()
    rows = []
    for path in a.landscapes:
        for objective in ("train", "forward"):
            try:
                ReplayBackend(path, V1, objective=objective)
            except LogError:
                continue  # a forward-only landscape
            for mode in ("full", "quick"):
                for noise, seeds in ((0.0, [0]), (a.noise, list(range(a.seeds)))):
                    runs = [run_one(path, objective, mode, noise, s) for s in seeds]
                    worst = max(runs, key=lambda r: r["regret"])
                    rows.append([os.path.basename(path), objective, mode, f"{noise:.0%}", len(seeds), runs[0]["space"],
                                 max(r["measurements"] for r in runs), f"{max(r['wall_s'] for r in runs):.2f}",
                                 worst["pick"], f"{100 * worst['regret']:.2f}%",
                                 f"{100 * sum(r['regret'] for r in runs) / len(runs):.2f}%"])
    print(tabulate(rows, headers=["landscape", "objective", "mode", "noise", "seeds", "space", "max meas.", "max wall s",
                                  "worst pick", "worst regret", "mean regret"], tablefmt="github"))


if __name__ == "__main__":
    main()
