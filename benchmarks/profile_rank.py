#!/usr/bin/env python3
"""cProfile every rank of a tuning run, to see where the time between kernels goes.

    torchrun --standalone --nproc_per_node 2 benchmarks/profile_rank.py --out /tmp/prof --mode quick --model deepseek-v3

Writes <out>/rank<R>.prof (pstats) and <out>/rank<R>.txt (the 40 most expensive calls, cumulative and own time)."""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys


def main() -> int:
    args = sys.argv[1:]
    out = "profile"
    if args[:1] == ["--out"]:
        out, args = args[1], args[2:]
    os.makedirs(out, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    sys.argv = [sys.argv[0], *args]  # the rank's own flags, as the launcher passes them
    from deepep_tune.tune.rank import main as rank_main

    prof = cProfile.Profile()
    code = prof.runcall(rank_main)
    prof.dump_stats(os.path.join(out, f"rank{rank}.prof"))
    text = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(text.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
