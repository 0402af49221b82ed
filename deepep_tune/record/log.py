"""The measurement log: append-only JSON lines, one per event, flushed as written.

Lines with an "op" key are measurements (one per measurement, nothing else has that key).
Other lines carry an "event": header (first line), start (written before a measurement, so a rank
that dies mid-measurement leaves a trace), resume, interrupted (Ctrl-C/SIGTERM), failed (an error a
relaunch cannot fix), restart (the GPU context was lost: continue in a fresh process), done."""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..knobs import OPS, Knobs, KnobSpace


class LogError(Exception):
    """A log or landscape file that cannot be used; the message says what to do."""


def log_path(out_dir: str, ep_size: int, run_id: str) -> str:
    return os.path.join(out_dir, "logs", f"tune_ep{ep_size}_{run_id}.jsonl")


def new_run_id() -> str:
    t = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t)) + f"-{int(t * 1e6) % 1_000_000:06d}"


class LogWriter:
    def __init__(self, path: str, create: bool) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # O_EXCL: two runs in one out-dir never share a log.
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise LogError(f"{path} already exists (another run uses it); pick another --run-id") from None
        self.f = os.fdopen(fd, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record, allow_nan=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclass
class LogContents:
    path: str
    header: dict[str, Any] | None
    measurements: list[dict[str, Any]] = field(default_factory=list)
    dangling: list[dict[str, Any]] = field(default_factory=list)  # started, never finished
    finished: bool = False
    truncated_line: int | None = None  # 1-based line number of a cut-off last line
    failed: str | None = None  # the run stopped on an error that a relaunch cannot fix
    restart: bool = False  # the run stopped so that a fresh process can continue (GPU context lost)
    interrupted: bool = False  # the user stopped the run (Ctrl-C/SIGTERM)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"cannot read {path}: {e}") from None


def _is_measurement(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get("op") in OPS


def read_log(path: str) -> LogContents:
    """Parse a log written by this tool. A cut-off last line is tolerated and reported."""
    lines = list(_lines(path))
    out = LogContents(path, None)
    started: dict[int, dict[str, Any]] = {}
    for n, line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n"):
                out.truncated_line = n
                break
            raise LogError(f"{path}:{n} is not valid JSON; this is not a deepep-tune log") from None
        if n == 1:
            if not (isinstance(rec, dict) and rec.get("event") == "header"):
                raise LogError(f"{path} does not start with a deepep-tune header; pass a log written by this tool")
            out.header = rec
            continue
        if _is_measurement(rec):
            out.measurements.append(rec)
            started.pop(rec.get("seq", -1), None)
        elif isinstance(rec, dict) and rec.get("event") == "start":
            started[rec["seq"]] = rec
        elif isinstance(rec, dict) and rec.get("event") == "resume":
            out.failed, out.restart, out.interrupted = None, False, False
            started.clear()  # the resume wrote a record for each dangling start
        elif isinstance(rec, dict) and rec.get("event") == "failed":
            out.failed = str(rec.get("error"))
        elif isinstance(rec, dict) and rec.get("event") == "restart":
            out.restart = True
        elif isinstance(rec, dict) and rec.get("event") == "interrupted":
            started.clear()  # stopped on purpose: the config in flight did not crash, measure it again
            out.interrupted = True
        elif isinstance(rec, dict) and rec.get("event") == "done":
            out.finished = True
    if out.header is None:
        raise LogError(f"{path} is empty; pass a log written by this tool")
    out.dangling = list(started.values())
    return out


def drop_partial_line(path: str) -> None:
    """Cut a log back to its last complete line, so appended records start on a line of their own."""
    with open(path, "rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def unfinished_log(resume: str, out_dir: str, ep_size: int) -> str:
    """The log --resume continues: the one given, else the newest unfinished one in out_dir (LogError if none)."""
    path = resume or newest_unfinished(out_dir, ep_size)
    if not path:
        raise LogError(f"--resume: no unfinished EP{ep_size} run under {os.path.join(out_dir, 'logs')}; "
                       "start a new run without --resume")
    return path


def newest_unfinished(out_dir: str, ep_size: int) -> str | None:
    paths = sorted(glob.glob(os.path.join(out_dir, "logs", f"tune_ep{ep_size}_*.jsonl")), key=os.path.getmtime, reverse=True)
    for p in paths:
        try:
            if not read_log(p).finished:
                return p
        except LogError:
            continue
    return None


def landscape_library(path: str) -> str | None:
    """The library a landscape was measured with: its log header's, its first line's "library", or None."""
    first = next(iter(_lines(path)), None)
    if first is None:
        return None
    try:
        rec = json.loads(first[1])
    except json.JSONDecodeError:
        return None
    return rec.get("library") if isinstance(rec, dict) else None


def read_landscape(path: str, decl: KnobSpace) -> list[dict[str, Any]]:
    """Measurements for the replay backend: a log of this tool, or plain JSONL with one line per config
    ({"op", <the library's knobs>, "time_us"}, optionally "num_tokens", e.g. {"op", "num_sms", "nvl_chunk",
    "nvl_buffer", "time_us"} for DeepEP v1). The first record per (num_tokens, op, config) wins."""
    recs: list[dict[str, Any]] = []
    first = next(iter(_lines(path)), None)
    if first is None:
        raise LogError(f"{path} is empty; pass a landscape or a log written by this tool")
    is_log = '"header"' in first[1]
    if is_log:
        recs = read_log(path).measurements
    else:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise LogError(f"{path}:{n} is not valid JSON; a landscape has one JSON object per line") from None
            if not decl.is_record(rec) or not isinstance(rec.get("time_us"), (int, float)):
                op = rec.get("op") if isinstance(rec, dict) else None
                knobs = "/".join(decl.knobs.get(op, decl.knobs["dispatch"]))
                raise LogError(f"{path}:{n} lacks op/{knobs}/time_us of {decl.library}; see README 'Replay'")
            recs.append(rec)
    seen: dict[tuple[Any, str, Knobs], dict[str, Any]] = {}
    for rec in recs:
        if not decl.is_record(rec):
            raise LogError(f"{path} holds measurements of another library than {decl.library}; pass --library")
        seen.setdefault((rec.get("num_tokens"), *decl.key_of(rec)), rec)
    if not seen:
        raise LogError(f"{path} holds no measurements")
    return list(seen.values())
