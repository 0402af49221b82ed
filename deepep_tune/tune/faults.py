"""Fault injection for tests: DEEPEP_TUNE_INJECT="<kind>@<op>:<knob values, comma-separated>[@rank]" (DeepEP v1:
<num_sms>,<nvl_chunk>,<nvl_buffer>). kind is raise (host-side exception, like a DeepEP assert), abort (a device trap kills the process)
or hang (a kernel that never finishes). Without @rank it fires on every rank."""

from __future__ import annotations

import os
import time

from ..knobs import Knobs, KnobSpace

ENV = "DEEPEP_TUNE_INJECT"
EXTRA_ENV = "DEEPEP_TUNE_EXTRA_CONFIGS"


def extra_configs(decl: KnobSpace) -> list[tuple[str, Knobs]]:
    """DEEPEP_TUNE_EXTRA_CONFIGS="dispatch:24,16,8;combine:32,8,8192": configs added to the space WITHOUT the
    tuner's validation (and not counted when sizing the buffer), to show how DeepEP's own rejections are
    recorded. For tests only."""
    out = []
    for item in filter(None, os.environ.get(EXTRA_ENV, "").split(";")):
        op, _, nums = item.partition(":")
        out.append((op, decl.config(op, *(int(x) for x in nums.split(",")))))
    return out


class InjectedError(RuntimeError):
    pass


def maybe_inject(op: str, cfg: Knobs, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(";"):
        kind, _, rest = item.partition("@")
        where, _, who = rest.partition("@")
        target_op, _, nums = where.partition(":")
        if target_op != op or tuple(int(x) for x in nums.split(",")) != cfg.values:
            continue
        if who and int(who) != rank:
            continue
        if kind == "raise":
            raise InjectedError(f"injected failure at {op} {cfg}")
        if kind == "abort":
            os.abort()
        if kind == "hang":
            while True:
                time.sleep(3600)
