"""What torchrun starts on every rank: `torchrun ... -m deepep_tune.tune.rank --mode quick ...` (the launcher's
command; tune_singlenode.py is the same for a torchrun line typed by hand)."""

import signal
import sys


def main() -> int:
    # Before torch starts any thread: SIGINT/SIGTERM stay blocked in every thread but the one that waits for
    # them (tune/interrupts.py), which can then act even while the main thread sits in a CUDA call.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    from .run import main as run_main

    return run_main()


if __name__ == "__main__":
    sys.exit(main())
