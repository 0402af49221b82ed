"""A signal must stop a rank within seconds even while its main thread sits in a C call that never returns
to Python (a CUDA sync, DeepEP's CPU wait), whichever thread the kernel delivers the signal to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _helpers import ROOT

CHILD = r"""
import ctypes, signal, sys, threading, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})   # as tune_singlenode.py does
from deepep_tune.tune import interrupts
interrupts.install_signal_handlers(rank=0)
if sys.argv[1] == "foreign-thread":
    # a library thread with its own mask (CUDA's, on the GPU): the kernel may deliver the signal there, and
    # it does so for sure when the signal is directed at that thread
    def library_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        time.sleep(1.0)
        signal.pthread_kill(threading.get_ident(), int(sys.argv[2]))
        time.sleep(60)
    threading.Thread(target=library_thread, daemon=True).start()
time.sleep(0.5)
print("ready", flush=True)
ctypes.CDLL(None).sleep(60)   # main thread in C, never back in Python
"""


@pytest.mark.parametrize("where", ["own-threads", "foreign-thread"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_process_blocked_in_c(where, sig):
    p = subprocess.Popen([sys.executable, "-c", CHILD, where, str(int(sig))], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        t0 = time.time()
        if where == "own-threads":
            os.kill(p.pid, sig)
        assert p.wait(timeout=20) == 130
        assert time.time() - t0 < 10
    finally:
        p.kill()
