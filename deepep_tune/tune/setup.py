"""Opening a run on every rank: what a resumed log already holds, the library's knob space, the backend (with the
one SM limit every backend and the baselines obey), and the log."""

from __future__ import annotations

import datetime
import importlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from .. import __version__
from ..knobs import OPS, KnobSpace, Space
from ..record.log import (
    LogError,
    LogWriter,
    drop_partial_line,
    log_path,
    new_run_id,
    read_log,
    unfinished_log,
)
from . import interrupts
from .backends.base import Backend
from .faults import extra_configs
from .measure import crashed_record
from .options import Options, resume_error

CRASHED = "a rank died or hung during this measurement (device trap, abort, or the hang watchdog)"
T = TypeVar("T")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    argv: tuple[str, ...]  # this run's flags, for the commands it prints


def say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def on_all_ranks(step: Callable[[], T], what: str, rank: int) -> T:
    """Run a set-up step on every rank; if it fails on any rank, every rank raises the same one-line error
    (so they exit together instead of hanging in the next collective)."""
    result, err = None, None
    try:
        result = step()
    except (UsageError, LogError, OSError, ValueError) as e:
        err = str(e)
    except ImportError as e:
        err = f"cannot import deep_ep ({e}): install DeepEP for this torch, or use --backend reference"
    except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory allocating the Buffer: one line, all ranks
        err = f"{what} failed on rank {rank}: {type(e).__name__}: {e}"
        if "busy or unavailable" in str(e):
            # Seen right after a run was killed with kernels in flight under MPS: it passes in seconds.
            interrupts.mark_gpu_busy()
    errs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((e for e in errs if e), None)
    if first:
        raise UsageError(first)
    return result  # type: ignore[return-value]


# --- resume -------------------------------------------------------------------------------------------
def resume_state(o: Options, ranks: Ranks, library: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(log path, prior measurements, dangling starts) of this run; decided on rank 0, shared with all."""
    state: list[Any] = [None]
    if ranks.rank == 0:
        try:
            state[0] = _resume_state(o, ranks.world, library)
        except (LogError, UsageError) as e:
            state[0] = str(e)
    dist.broadcast_object_list(state, src=0)
    if isinstance(state[0], str):
        raise UsageError(state[0])
    interrupts.set_log(state[0][0])
    return state[0]


def _resume_state(o: Options, world: int, library: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    if o.outputs.resume is None:
        return log_path(o.outputs.out_dir, world, o.outputs.run_id or new_run_id()), [], []
    path = unfinished_log(o.outputs.resume, o.outputs.out_dir, world)
    log = read_log(path)
    err = resume_error(log.header, log.finished, path, o, world, library)
    if err:
        raise UsageError(err)
    if log.truncated_line:
        drop_partial_line(path)
        say(0, f"[resume] {path}: line {log.truncated_line} was cut off (killed mid-write); dropped it")
    return path, log.measurements, log.dangling


# --- the space and the backend ------------------------------------------------------------------------
def sweep_space(o: Options, decl: KnobSpace, world: int, sms_cap: int) -> tuple[Space, int]:
    """The configs this run may measure: the library's grid up to sms_cap, without configs that do not fit
    (DeepEP v1: an NVL buffer over --max-buffer-gb or views that overflow its 32-bit byte counts); plus the test
    hook's extras (deliberately unvalidated)."""
    limit = o.search.max_buffer_gb * 2**30
    w = o.shape
    space, pruned = decl.build(sms_cap, lambda op, c: decl.fits is None or decl.fits(op, c, world, w, limit) is None)
    extra = extra_configs(decl)
    if extra:
        space = decl.space_of([(op, c) for op in OPS for c in space.configs(op)] + extra)
    return space, pruned


def run_sms_cap(hardware_cap: int | None, max_sms: int | None) -> int | None:
    """The one SM limit of a run: the hardware's (per rank) and --max-sms. The space, every backend and the
    baselines obey it."""
    caps = [c for c in (hardware_cap, max_sms) if c is not None]
    return min(caps) if caps else None


# Each backend module offers create(o, ranks, decl, sms_cap) -> (backend, space, pruned) and hardware_sms_cap(ranks);
# a new EP library is one more entry here, its module, and its knob declaration (knobs.LIBRARIES).
BACKEND_MODULES = {
    "deepep": "deepep_tune.tune.backends.deepep",
    "reference": "deepep_tune.tune.backends.reference",
    "replay": "deepep_tune.tune.backends.replay",
    "deepep-v2": "deepep_tune.tune.backends.elastic",
    "hybridep": "deepep_tune.tune.backends.hybrid",
}


def create_backend(o: Options, ranks: Ranks, decl: KnobSpace) -> tuple[Backend, Space, int]:
    """The run's backend, its space, and the one SM limit (set on the backend here, for every backend)."""
    module = importlib.import_module(BACKEND_MODULES[o.search.backend])
    cap = run_sms_cap(module.hardware_sms_cap(o, ranks), o.search.max_sms)
    backend, space, pruned = module.create(o, ranks, decl, cap)
    backend.sms_cap = cap
    backend.use(o.shape)
    return backend, space, pruned


# --- the log --------------------------------------------------------------------------------------------
def open_log(o: Options, ranks: Ranks, path: str, prior: list[dict[str, Any]], dangling: list[dict[str, Any]],
             hw: dict[str, Any], decl: KnobSpace) -> LogWriter | None:
    """Rank 0 writes the log: a header for a new run; for a resumed one, a crashed record per dangling start."""
    if ranks.rank != 0:
        return None
    log = LogWriter(path, create=o.outputs.resume is None)
    if o.outputs.resume is None:
        log.write({"event": "header", "tool_version": __version__, "ep_size": ranks.world, "mode": o.search.mode,
                   "backend": o.search.backend, "library": decl.library, "workload": o.shape.as_dict(),
                   "token_counts": list(o.workload.num_tokens),
                   "options": {k: v for k, v in o.as_dict().items() if k != "workload"}, "hardware": hw,
                   "started": now()})
        return log
    for d in dangling:
        log.write(crashed_record(d["measure"], d["seq"], f"{CRASHED}; watchdog {o.measurement.timeout_s} s", decl))
    log.write({"event": "resume", "t": time.time(), "kept_measurements": len(prior), "crashed": len(dangling)})
    say(0, f"[resume] {path}: {len(prior)} measurements kept, {len(dangling)} crashed config(s) recorded as failed")
    return log
