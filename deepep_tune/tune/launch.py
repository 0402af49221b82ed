"""Supervisor behind run.sh: validate flags before any rank starts, launch the ranks with torchrun, and
after a rank dies or hangs inside a measurement, relaunch with --resume so the sweep goes on (the
resumed run records that config as failed). Bounded retries; Ctrl-C stops everything."""

from __future__ import annotations

import os
import shutil
import signal
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
    """What to do after torchrun exited with rc, from the log the ranks left and the launcher's own state."""
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
    """Forwards torchrun's and the ranks' stderr until the user interrupts, and nothing after: torchrun's own
    signal handling prints tracebacks that tell a user who pressed Ctrl-C nothing (the launcher prints one
    line with the --resume command instead)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.muted = fd, False

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            if not self.muted:
                os.write(sys.stderr.fileno(), chunk)
        os.close(self.fd)


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", RANK_MODULE, *args]


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


class Torchrun:
    """One torchrun at a time with its stderr relayed; Ctrl-C and SIGTERM go to it, and mute the relay."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.relay: StderrRelay | None = None
        self.interrupted = False
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.interrupted = True
        if self.relay is not None:
            self.relay.muted = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    def run(self, cmd: list[str]) -> int:
        print("[run] " + " ".join(cmd), file=sys.stderr, flush=True)
        self.child = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        assert self.child.stderr is not None
        self.relay = StderrRelay(os.dup(self.child.stderr.fileno()))
        self.child.stderr.close()
        self.relay.start()
        rc = self.child.wait()
        self.relay.join(timeout=5)
        return rc


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
    torchrun, history, t0 = Torchrun(), History(), time.time()
    while True:
        busy = gpu_busy_marker(path)
        if os.path.exists(busy):  # left by an earlier run started with torchrun directly
            os.unlink(busy)
        sys.stderr.flush()
        rc = torchrun.run(torchrun_cmd(ranks, args))
        log = _log(path)
        d = decide(rc, log, os.path.exists(busy), torchrun.interrupted, history, retries, resume_hint)
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
