"""Supervisor behind run.sh: validate flags before any rank starts, launch one process per rank as torchrun would, and
after a rank dies or hangs inside a measurement, relaunch with --resume so the sweep goes on (the
resumed run records that config as failed). Bounded retries; Ctrl-C stops everything."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

from ..deepep.gpus import gpu_count
from ..record.log import (
    LogContents,
    LogError,
    log_path,
    new_run_id,
    read_landscape,
    read_log,
    unfinished_log,
)
from .interrupts import gpu_busy_marker, mark_interrupted
from .options import (
    GPU_BACKENDS,
    Options,
    OptionsError,
    build_parser,
    check_options,
    drop_options,
    library_of,
    parse_options,
    rerun_command,
    resume_error,
)

LAUNCHED_AT_ENV = "DEEPEP_TUNE_LAUNCHED_AT"  # read by the ranks (tune/run.py)
RANK_MODULE = "deepep_tune.tune.rank"  # a module, not a script path: works from any install and directory
STARTUP_WAITS, STARTUP_WAIT_S, RELAUNCH_PAUSE_S = 3, 10, 5
USAGE = "usage: ./run.sh [ranks: 2|4|8, default all GPUs] [quick|full] [tuner flags, see --help]"


@dataclass(frozen=True)
class History:
    relaunches: int = 0
    progress: int = -1  # measurements + crashed configs in the log at the last relaunch
    startup_waits: int = 0


@dataclass(frozen=True)
class Decision:
    action: str  # "done", "stop", "wait" (retry the same launch after a pause) or "relaunch" (with --resume)
    code: int
    message: str
    history: History


def decide(rc: int, log: LogContents | None, gpu_busy: bool, interrupted: bool, history: History,
           retries: int, resume_hint: str) -> Decision:
    """What to do after the ranks exited with rc, from the log the ranks left and the launcher's own state."""
    def stop(code: int, msg: str) -> Decision:
        return Decision("stop", code, msg, history)

    def wait(msg: str) -> Decision:
        h = replace(history, startup_waits=history.startup_waits + 1)
        return Decision("wait", 0, f"{msg}; waiting {STARTUP_WAIT_S} s ({h.startup_waits}/{STARTUP_WAITS})", h)

    if rc == 0:
        return Decision("done", 0, "", history)
    if interrupted or (log is not None and log.interrupted):
        return stop(130, f"interrupted; measurements so far are in the log. Continue with: {resume_hint}")
    if gpu_busy and history.startup_waits < STARTUP_WAITS:
        return wait("the GPU is busy (a killed run's kernels are still being cleaned up)")
    if log is None:
        return stop(rc or 1, "error: the tuner failed before writing its log (see the messages above)")
    if log.finished:
        return Decision("done", rc, "", history)
    if log.failed:
        return stop(2, f"error: {log.failed}")
    if not (log.dangling or log.restart):
        return stop(rc or 1, "error: the tuner failed outside a measurement (see the messages above); not "
                             f"relaunching. The log keeps every measurement: {resume_hint}")
    progress = len(log.measurements) + len(log.dangling)
    if progress <= history.progress:
        # Right after a rank died with a kernel in flight, the GPU (the MPS server above all) can refuse new
        # contexts for a few seconds ("device busy or unavailable"): give it time before giving up.
        if history.startup_waits < STARTUP_WAITS:
            return wait("start-up failed right after a crash; giving the GPU time to recover")
        return stop(rc or 1, f"error: relaunching made no progress; not relaunching again. {resume_hint}")
    if history.relaunches >= retries:
        return stop(rc or 1, f"error: gave up after {retries} relaunches; the log keeps every measurement. "
                             f"Continue with: {resume_hint}")
    h = History(history.relaunches + 1, progress, 0)
    why = "the GPU context was lost" if log.restart and not log.dangling else "a rank died or hung"
    return Decision("relaunch", rc, f"{why} (exit {rc}); relaunching to resume (attempt {h.relaunches}/{retries})", h)


def _log(path: str) -> LogContents | None:
    try:
        return read_log(path)
    except (LogError, FileNotFoundError):
        return None


def _file_error(o: Options, ranks: int, resume_path: str | None) -> str | None:
    """A foreign, unreadable, finished or mismatched --resume log, or a bad --replay landscape or --library, is
    refused before any rank starts."""
    try:
        decl = library_of(o)
        if o.measurement.replay:
            read_landscape(o.measurement.replay, decl)
        if resume_path:
            log = read_log(resume_path)
            return resume_error(log.header, log.finished, resume_path, o, ranks, decl.library)
    except (LogError, ValueError) as e:
        return str(e)
    return None


class StderrRelay(threading.Thread):
    """Forwards a rank's stderr until the user interrupts, and nothing after: the tracebacks of an interrupted
    process tell a user who pressed Ctrl-C nothing (the launcher prints one line with the --resume command
    instead)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.muted = fd, False

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            if not self.muted:
                os.write(sys.stderr.fileno(), chunk)
        os.close(self.fd)


def rank_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", RANK_MODULE, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def rank_env(rank: int, world: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun's environment contract for a single-node rank, so tune/run.py cannot tell the two launches apart."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each start a thread per core
    return env


def bytecode_cache() -> str | None:
    """Where the ranks may keep compiled bytecode when torch's install holds none and cannot take any (a read-only
    venv): there every rank compiled ~900 of torch's modules at each start, 1.9 s of its import on the H200 pair
    (benchmarks/gpu_startup.sh). Found without importing torch; None where torch's own caches serve."""
    spec = importlib.util.find_spec("torch")
    where = list(spec.submodule_search_locations or []) if spec else []
    if not where or os.path.isdir(os.path.join(where[0], "__pycache__")) or os.access(where[0], os.W_OK):
        return None
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deepep-tune", "pycache")


class LocalRanks:
    """One process per rank on this node, as torchrun --standalone starts them, without torchrun's own interpreter
    and torch import in front (4.5-5.7 s before any rank started on the H200 pair, benchmarks/gpu_startup.sh).
    As torchrun: when one rank fails the others are stopped, and the exit code is the first failure's. Ctrl-C and
    SIGTERM go to the ranks and mute the relay of their stderr."""

    GRACE_S = 10.0  # after a rank failed: how long the others get to record it and exit before SIGKILL

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.relays: list[StderrRelay] = []
        self.interrupted = False
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.interrupted = True
        for relay in self.relays:
            relay.muted = True
        self._signal_all(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def run(self, world: int, args: list[str]) -> int:
        port, cmd = free_port(), rank_cmd(args)
        print(f"[run] {world} ranks (torchrun's environment, port {port}): " + " ".join(cmd), file=sys.stderr,
              flush=True)
        self.procs, self.relays = [], []
        base, cache = dict(os.environ), bytecode_cache()
        if cache:
            base.setdefault("PYTHONPYCACHEPREFIX", cache)
        for r in range(world):
            p = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=rank_env(r, world, port, base))
            assert p.stderr is not None
            relay = StderrRelay(os.dup(p.stderr.fileno()))
            p.stderr.close()
            relay.start()
            self.procs.append(p)
            self.relays.append(relay)
        rc = self._wait()
        for relay in self.relays:
            relay.join(timeout=5)
        return rc

    def _wait(self) -> int:
        failed: int | None = None
        deadline = None
        while [p.poll() for p in self.procs].count(None):  # poll every rank (any() would stop at the first alive)
            if failed is None:
                failed = next((p.returncode for p in self.procs if p.returncode not in (None, 0)), None)
                if failed is not None:  # a peer of a dead rank would wait in its next collective forever
                    self._signal_all(signal.SIGTERM)
                    deadline = time.time() + self.GRACE_S
            elif deadline is not None and time.time() > deadline:
                self._signal_all(signal.SIGKILL)
                deadline = None
            time.sleep(0.05)
        codes = [p.returncode for p in self.procs]
        return failed if failed is not None else next((c for c in codes if c), 0)


def preflight(argv: list[str]) -> tuple[int, str, list[str], Options, str] | int:
    """(ranks, mode, flags, options, log path) for a valid command line, else the exit code after printing
    the reason (one line)."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        build_parser().print_help()
        return 0
    ranks: int | None = None
    if argv and argv[0].lstrip("-").isdigit():
        ranks = int(argv.pop(0))
    mode = argv.pop(0) if argv and not argv[0].startswith("-") else "quick"
    try:
        o = parse_options(["--mode", mode, *argv])
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(o, int):
        return 2 if o else 0
    real = o.search.backend in GPU_BACKENDS
    gpus = gpu_count() if real else 0
    if ranks is None:
        ranks = gpus if real else 2
    # With no GPU and no rank count, say what is missing (deep_ep, a GPU), not "0 ranks".
    err = check_options(o, ranks or 2, gpus if real else None)
    out = o.outputs
    resume_path = None
    if not err and out.resume is not None:
        try:
            resume_path = unfinished_log(out.resume, out.out_dir, ranks)
        except LogError as e:
            err = str(e)
    err = err or _file_error(o, ranks, resume_path)
    if out.resume is None and not err:
        run_id = out.run_id or new_run_id()
        resume_path = log_path(out.out_dir, ranks, run_id)
        if os.path.exists(resume_path):
            err = (f"{resume_path} exists (another run uses --run-id {run_id}); pick another --run-id or use "
                   f"--resume {resume_path}")
        elif out.run_id is None:
            argv = [*argv, "--run-id", run_id]
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return ranks, mode, argv, o, resume_path or ""


def main(argv: list[str] | None = None) -> int:
    # the ranks report their phases from here on (tune/run.py phases); a relaunch keeps the first start
    os.environ.setdefault(LAUNCHED_AT_ENV, repr(time.time()))
    pre = preflight(list(sys.argv[1:] if argv is None else argv))
    if isinstance(pre, int):
        return pre
    ranks, mode, flags, o, path = pre
    # Each relaunch must record progress (the crashed config at least), so this only bounds a long chain.
    retries = int(os.environ.get("DEEPEP_TUNE_RETRIES", "10"))
    args = ["--mode", mode, *flags]
    resume_hint = rerun_command(ranks, mode, flags, resume=path)
    ranks_proc, history, t0 = LocalRanks(), History(), time.time()
    while True:
        busy = gpu_busy_marker(path)
        if os.path.exists(busy):  # left by an earlier run started with torchrun by hand
            os.unlink(busy)
        sys.stderr.flush()
        rc = ranks_proc.run(ranks, args)
        log = _log(path)
        d = decide(rc, log, os.path.exists(busy), ranks_proc.interrupted, history, retries, resume_hint)
        history = d.history
        if d.action == "done":
            if rc == 0:
                print(f"[run] done in {time.time() - t0:.1f} s (start-up included)", file=sys.stderr)
            return d.code
        if d.action == "stop":
            if d.code == 130 and log is not None and not log.interrupted:
                # the ranks are gone: the log says the stop was on purpose, so a resume measures the config
                # in flight again instead of recording it as crashed
                mark_interrupted(path, ranks_gone=True)
            # after Ctrl-C, a progress bar may have left its line open
            print(("\n[run] " if d.code == 130 else "") + d.message, file=sys.stderr)
            return d.code
        print(f"[run] {d.message}", file=sys.stderr, flush=True)
        if d.action == "wait":
            time.sleep(STARTUP_WAIT_S)
            continue
        args = drop_options(args, ("--resume",)) + ["--resume", path]
        time.sleep(RELAUNCH_PAUSE_S)


if __name__ == "__main__":
    sys.exit(main())
