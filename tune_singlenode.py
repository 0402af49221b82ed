#!/usr/bin/env python3
"""Tune DeepEP intranode configs on this node. One process per GPU:

    torchrun --standalone --nproc_per_node 4 tune_singlenode.py --mode quick

or ./run.sh 4 quick (validates flags first and relaunches after a crashed config)."""

import sys

from deepep_tune.tune.rank import main

if __name__ == "__main__":
    sys.exit(main())
