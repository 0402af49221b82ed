"""Stopping a run: SIGINT/SIGTERM handling in a rank, and the marker that tells run.sh a stop was on purpose."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

EXIT_INTERRUPTED = 130

_log: str | None = None
user_interrupted = False


def set_log(log: str) -> None:
    global _log
    _log = log


def interrupt_marker(log: str) -> str:
    """A file next to the log that says the run was stopped on purpose (so run.sh does not relaunch it)."""
    return log + ".interrupted"


def gpu_busy_marker(log: str) -> str:
    """A file next to the log that says start-up found the GPU busy for now (run.sh waits and retries)."""
    return log + ".gpu_busy"


def _touch(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "a").close()
    except OSError:
        pass


def mark_interrupted() -> None:
    if _log:
        _touch(interrupt_marker(_log))


def mark_gpu_busy() -> None:
    if _log:
        _touch(gpu_busy_marker(_log))


def install_signal_handlers(rank: int) -> None:
    """SIGINT/SIGTERM are taken by one thread (blocked everywhere else), which raises KeyboardInterrupt in the
    main thread; if the main thread is blocked in a kernel or a collective and cannot get there, the process
    ends after a grace period (the log is flushed per line, so nothing measured is lost).
    A signal from torchrun (our parent) means a peer died or torchrun is shutting down: that is not the user
    stopping the run, so run.sh may relaunch and the config in flight counts as crashed. Any other sender
    (a user's kill, Ctrl-C in the terminal) marks the run as interrupted on purpose."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    # Threads started later (gloo, CUDA, the watchdog) inherit the mask; tune_singlenode.py blocks the signals
    # before importing torch, so no thread can take them (and leave them to a busy main thread).
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def waiter() -> None:
        global user_interrupted
        info = signal.sigwaitinfo(sigs)
        if info.si_pid != os.getppid():
            user_interrupted = True
            mark_interrupted()
        _thread.interrupt_main()
        time.sleep(5.0)
        if rank == 0:
            print("[tune] interrupted while blocked; exiting (resume with --resume)", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=waiter, daemon=True).start()
