"""Supervisor behind run.sh: validate flags before any rank starts, launch the ranks with torchrun, and
after a rank dies or hangs inside a measurement, relaunch with --resume so the sweep goes on (the
resumed run records that config as failed). Bounded retries; Ctrl-C stops everything."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .interrupts import gpu_busy_marker, interrupt_marker
from .logio import LogContents, LogError, drop_partial_line, log_path, new_run_id, newest_unfinished, read_landscape, read_log
from .models import list_models
from .options import (Options, OptionsError, build_parser, drop_options, gpu_error, options_error, options_from_args,
                      resume_error)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(HERE, "tune_singlenode.py")
STARTUP_WAITS, STARTUP_WAIT_S, RELAUNCH_PAUSE_S = 3, 10, 5
USAGE = "usage: ./run.sh [ranks: 2|4|8, default all GPUs] [quick|full] [tuner flags, see --help]"


def _gpu_count() -> int:
    """Visible GPUs without importing torch (which would add seconds to every launch)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]))
    return n


def _log(path: str) -> LogContents | None:
    try:
        return read_log(path)
    except (LogError, FileNotFoundError):
        return None


def _progress(log: LogContents) -> int:
    """Measurements recorded plus configs started and never finished (both are progress for a relaunch)."""
    return len(log.measurements) + len(log.dangling)


def _file_error(o: Options, ranks: int, resume_path: str | None) -> str | None:
    """A foreign, unreadable, finished or mismatched --resume log, or a bad --replay landscape, is refused
    before any rank starts."""
    try:
        if o.replay:
            read_landscape(o.replay)
        if resume_path:
            return resume_error(read_log(resume_path), o, ranks)
    except LogError as e:
        return str(e)
    return None


def _append_event(path: str, rec: dict) -> None:
    """The ranks are gone; note in their log that the run was stopped on purpose, so a resume measures the
    config in flight again instead of recording it as crashed."""
    if os.path.exists(path):
        drop_partial_line(path)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc), SCRIPT, *args]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        build_parser().print_help()
        return 0
    ranks: int | None = None
    if argv and argv[0].lstrip("-").isdigit():
        ranks = int(argv.pop(0))
    mode = argv.pop(0) if argv and not argv[0].startswith("-") else "quick"
    try:
        parsed = build_parser().parse_args(["--mode", mode, *argv])
    except SystemExit as e:  # argparse already printed its one-line error
        return 2 if e.code else 0
    if parsed.list_models:
        print(list_models())
        return 0
    try:
        o = options_from_args(parsed)
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpus = _gpu_count() if o.backend == "deepep" else 0
    if ranks is None:
        ranks = gpus if o.backend == "deepep" else 2
    # With no GPU and no rank count, say what is missing (deep_ep, a GPU), not "0 ranks".
    err = options_error(o, ranks or 2) if ranks == 0 else options_error(o, ranks)
    if not err and o.backend == "deepep":
        err = gpu_error(o, ranks, gpus)
    resume_path = o.resume or (newest_unfinished(o.out_dir, ranks) if o.resume == "" else None)
    if not err and o.resume == "" and resume_path is None:
        err = (f"--resume: no unfinished EP{ranks} run under {os.path.join(o.out_dir, 'logs')}; "
               "start a new run without --resume")
    if not err:
        err = _file_error(o, ranks, resume_path)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Each relaunch must record progress (the crashed config at least), so this only bounds a long chain.
    retries = int(os.environ.get("DEEPEP_TUNE_RETRIES", "10"))
    args = ["--mode", mode, *argv]
    if o.resume is None:
        run_id = o.run_id or new_run_id()
        path = log_path(o.out_dir, ranks, run_id)
        if os.path.exists(path):
            print(f"error: {path} exists (another run uses --run-id {run_id}); pick another --run-id or use "
                  f"--resume {path}", file=sys.stderr)
            return 2
        if o.run_id is None:
            args += ["--run-id", run_id]
    else:
        path = resume_path or ""
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    child: subprocess.Popen | None = None
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    attempt, before, startup_waits = 0, -1, 0
    t0 = time.time()
    while True:
        cmd = torchrun_cmd(ranks, args)
        print("[run] " + " ".join(cmd), file=sys.stderr, flush=True)
        marker, busy = interrupt_marker(path), gpu_busy_marker(path)
        for m in (marker, busy):  # left by an earlier run started with torchrun directly
            if os.path.exists(m):
                os.unlink(m)
        child = subprocess.Popen(cmd)
        rc = child.wait()
        if rc == 0:
            print(f"[run] done in {time.time() - t0:.1f} s (start-up included)", file=sys.stderr)
            return 0
        if os.path.exists(marker):  # a rank got SIGINT/SIGTERM from the user: stopped on purpose, not a crash
            interrupted = True
            os.unlink(marker)
        if interrupted:
            _append_event(path, {"event": "interrupted"})
            print(f"[run] interrupted; measurements so far are in {path}. Continue with: "
                  f"./run.sh {ranks} {mode} {' '.join(argv)} --resume {path}".replace("  ", " "), file=sys.stderr)
            return 130
        if os.path.exists(busy) and startup_waits < STARTUP_WAITS:
            startup_waits += 1
            print(f"[run] the GPU is busy (a killed run's kernels are still being cleaned up); waiting "
                  f"{STARTUP_WAIT_S} s ({startup_waits}/{STARTUP_WAITS})", file=sys.stderr, flush=True)
            time.sleep(STARTUP_WAIT_S)
            continue
        log = _log(path)
        if log is None:
            print("error: the tuner failed before writing its log (see the messages above)", file=sys.stderr)
            return rc or 1
        if log.finished:
            return rc
        if log.failed:
            print(f"error: {log.failed}", file=sys.stderr)
            return 2
        if not (log.dangling or log.restart):
            print("error: the tuner failed outside a measurement (see the messages above); not relaunching. "
                  f"The log {path} keeps every measurement (--resume {path})", file=sys.stderr)
            return rc or 1
        now = _progress(log)
        if now <= before:
            # Right after a rank died with a kernel in flight, the GPU (the MPS server above all) can refuse
            # new contexts for a few seconds ("device busy or unavailable"): give it time before giving up.
            if startup_waits < STARTUP_WAITS:
                startup_waits += 1
                print(f"[run] start-up failed right after a crash; waiting {STARTUP_WAIT_S} s for the GPU to "
                      f"recover ({startup_waits}/{STARTUP_WAITS})", file=sys.stderr, flush=True)
                time.sleep(STARTUP_WAIT_S)
                continue
            print("error: relaunching made no progress; not relaunching again. "
                  f"The log {path} keeps every measurement (--resume {path})", file=sys.stderr)
            return rc or 1
        startup_waits = 0
        attempt += 1
        if attempt > retries:
            print(f"error: gave up after {retries} relaunches; the log {path} keeps every measurement. "
                  f"Continue with --resume {path}", file=sys.stderr)
            return rc or 1
        before = now
        why = "the GPU context was lost" if log.restart and not log.dangling else "a rank died or hung"
        print(f"[run] {why} (exit {rc}); relaunching to resume {path} (attempt {attempt}/{retries})",
              file=sys.stderr, flush=True)
        args = drop_options(args, ("--resume",)) + ["--resume", path]
        time.sleep(RELAUNCH_PAUSE_S)


if __name__ == "__main__":
    sys.exit(main())
