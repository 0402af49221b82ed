"""`python -m deepep_tune.optimal`: the OPTIMAL_CONFIGS.md renderer lives in deepep_tune/report/optimal.py."""

import sys

from .report.optimal import main

if __name__ == "__main__":
    sys.exit(main())
