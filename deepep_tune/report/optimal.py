"""Write OPTIMAL_CONFIGS.md from results files produced by this tool (never by hand).

    python3 -m deepep_tune.optimal --out OPTIMAL_CONFIGS.md RESULTS_EP2.json RESULTS_EP4_colocated.json ..."""

from __future__ import annotations

import argparse
import sys

from ..record.results import read_results
from .render import optimal_configs_markdown


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write OPTIMAL_CONFIGS.md from deepep-tune results files")
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="OPTIMAL_CONFIGS.md")
    a = ap.parse_args(argv)
    try:
        text = optimal_configs_markdown([(p, read_results(p)) for p in a.results])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot use {a.results}: {e}; pass RESULTS_*.json files written by deepep-tune", file=sys.stderr)
        return 2
    with open(a.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
