#!/usr/bin/env python3
"""Tune DeepEP intranode configs on this node. One process per GPU:

    torchrun --standalone --nproc_per_node 4 tune_singlenode.py --mode quick

or ./run.sh 4 quick (validates flags first and relaunches after a crashed config)."""

import signal
import sys

# Before torch starts any thread: SIGINT/SIGTERM stay blocked in every thread but the one that waits for
# them (deepep_tune/interrupts.py), which can then act even while the main thread sits in a CUDA call.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from deepep_tune.tuner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
