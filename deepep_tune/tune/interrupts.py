"""Stopping a run: SIGINT/SIGTERM handling in a rank, and the log events that tell run.sh why a run stopped."""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from ..record.log import drop_partial_line

EXIT_INTERRUPTED = 130

_log: str | None = None


def set_log(log: str) -> None:
    global _log
    _log = log


def current_log() -> str | None:
    return _log


def append_event(path: str, rec: dict[str, Any]) -> None:
    """One line appended with a single O_APPEND write: safe beside the rank's own log writer (whole lines,
    never interleaved) and from a signal-waiting thread while the main thread is stuck in CUDA."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


def gpu_busy_marker(log: str) -> str:
    """A file next to the log that says start-up found the GPU busy for now (run.sh waits and retries). A
    marker, not a log event: the log does not exist yet when the backend fails to start."""
    return log + ".gpu_busy"


def mark_gpu_busy() -> None:
    if _log:
        os.makedirs(os.path.dirname(_log) or ".", exist_ok=True)
        open(gpu_busy_marker(_log), "a").close()


def mark_interrupted(path: str | None, ranks_gone: bool = False) -> None:
    """The log says the run was stopped on purpose (so run.sh does not relaunch it, and a resume measures the
    config in flight again instead of recording it as crashed). The one writer of that event, for the ranks and
    the launcher. Once the ranks are gone (the launcher), a line cut off by the kill is dropped first, so the
    event starts a line of its own; a rank never truncates a log its main thread may be writing."""
    if path and os.path.exists(path):
        if ranks_gone:
            drop_partial_line(path)
        append_event(path, {"event": "interrupted", "t": time.time()})


def install_signal_handlers(rank: int) -> None:
    """Stop within seconds on SIGINT/SIGTERM, even while the main thread sits in a CUDA call or a DeepEP
    CPU wait, where Python-level handlers never run. The log is flushed per line, so nothing is lost.

    Two paths, because a signal goes to any thread that does not block it:
    - our threads block both signals (tune_singlenode.py blocks them before torch starts any thread), and
      one of them takes them with sigwaitinfo, which names the sender. A signal from our parent (run.sh's launcher, or
      torchrun) means a peer died or the launcher is shutting down, not the user: run.sh may then relaunch, and the config
      in flight counts as crashed. Any other sender (a user's kill) marks the run as stopped on purpose.
    - threads that libraries start with their own mask (seen: CUDA's, on the GPU) can still take a signal.
      Python's C-level handler then runs there and writes to the wakeup fd; the sender is unknown, so only
      run.sh, which got the user's Ctrl-C itself, knows it was on purpose.
    Either way the main thread gets KeyboardInterrupt, and a helper ends the process after a grace period."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

    def stop_soon() -> None:
        time.sleep(5.0)
        if rank == 0:
            print("[tune] interrupted while blocked; exiting (resume with --resume)", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    def waiter() -> None:
        info = signal.sigwaitinfo(sigs)
        if info.si_pid != os.getppid():
            mark_interrupted(_log)  # any rank: the user may have signalled one rank only
        _thread.interrupt_main()
        stop_soon()

    def woken() -> None:
        os.read(rfd, 1)
        stop_soon()

    threading.Thread(target=waiter, daemon=True).start()
    threading.Thread(target=woken, daemon=True).start()
