"""Run under torchrun (gloo, CPU, PYTHONPATH=tests/fake_v2:ROOT) by tests/test_elastic_backend.py: each rank drives
the real ElasticBackend over the deep_ep stand-in and writes what it saw to OUT/rank<r>.json (the assertions
live in the test). Every rank makes the same calls in the same order; faults are injected on rank 0 only."""

import json
import os
import sys

import deep_ep
import torch
import torch.distributed as dist

from deepep_tune.deepep.elastic import V2
from deepep_tune.deepep.workload import Workload
from deepep_tune.tune.backends.elastic import ElasticBackend
from deepep_tune.tune.measure import Measurer, MeasureSettings

WORKLOAD = Workload(num_tokens=40, hidden=256, num_topk=4, num_experts=8, seed=3)
MAX_TOKENS = 64  # above num_tokens: the metadata's src_rank * num_max_tokens_per_rank must be decoded with it


def cfg(n):
    return V2.config("dispatch", n)


def outcome(fn):
    """('ok', error-or-None, parts) of a measurement, or ('raised', message, None)."""
    try:
        res = fn()
        return {"status": "ok", "error": res.error, "parts": sorted(res.parts), "n": [len(v) for v in res.parts.values()]}
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"status": "raised", "error": f"{type(e).__name__}: {e}"}


def with_fault(rank, name, fn, count=100):
    """fn() while the stand-in returns wrong data on rank 0 (every call: warm-up iterations included)."""
    if rank == 0:
        deep_ep.FAULTS[name] = count
    try:
        return fn()
    finally:
        deep_ep.FAULTS[name] = 0


def calls_of(fn):
    start = len(deep_ep.CALLS)
    out = fn()
    return out, [list(c) for c in deep_ep.CALLS[start:]]


def scenarios(b, rank):
    r = {"setup_jit": dict(b.first_call_s), "facts": b.facts()}
    r["dispatch16"], r["dispatch16_calls"] = calls_of(lambda: outcome(lambda: b.measure("dispatch", cfg(16), 1, 2)))
    r["combine24"], r["combine24_calls"] = calls_of(lambda: outcome(lambda: b.measure("combine", cfg(24), 1, 2)))
    r["jit_after"] = dict(b.first_call_s)
    r["dispatch16_again_calls"] = calls_of(lambda: b.measure("dispatch", cfg(16), 0, 1))[1]
    r["wrong_dispatch"] = with_fault(rank, "dispatch_row", lambda: outcome(lambda: b.measure("dispatch", cfg(16), 1, 2)))
    r["duplicate"] = with_fault(rank, "duplicate_row", lambda: outcome(lambda: b.measure("dispatch", cfg(16), 1, 2)))
    r["wrong_cached"] = with_fault(rank, "cached_row", lambda: outcome(lambda: b.measure("dispatch", cfg(16), 1, 2)))
    r["wrong_combine"] = with_fault(rank, "combine_row", lambda: outcome(lambda: b.measure("combine", cfg(24), 1, 2)))
    # a combine at a new num_sms needs a handle: a wrong handle dispatch on rank 0 must fail both ranks alike
    r["wrong_handle"] = with_fault(rank, "dispatch_row", lambda: outcome(lambda: b.measure("combine", cfg(32), 0, 1)),
                                   count=1)
    r["too_many_sms"] = outcome(lambda: b.measure("dispatch", cfg(deep_ep.stand_in_device_sms() + 2), 0, 1))
    r["fine_after"] = outcome(lambda: b.measure("combine", cfg(32), 0, 1))
    meas = Measurer(b, MeasureSettings(warmup=0, iters=2, timeout_s=60), rank, None)
    with_fault(rank, "dispatch_row", lambda: meas.time("dispatch", cfg(8)))
    r["measurer_record"] = {k: meas.records[-1][k] for k in ("status", "error", "num_sms", "op")}
    b.objective = "forward"
    r["forward"] = outcome(lambda: b.measure("dispatch", cfg(16), 0, 2))
    b.objective = "train"
    b.use(Workload(num_tokens=24, hidden=256, num_topk=4, num_experts=8, dispatch_dtype="fp8", seed=5))
    r["fp8_dispatch"] = outcome(lambda: b.measure("dispatch", cfg(16), 1, 2))
    r["fp8_combine"] = outcome(lambda: b.measure("combine", cfg(24), 1, 2))
    r["fp8_wrong"] = with_fault(rank, "dispatch_row", lambda: outcome(lambda: b.measure("dispatch", cfg(16), 0, 1)))
    r["describe"] = b.describe()
    return r


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    b = ElasticBackend(WORKLOAD, rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), MAX_TOKENS,
                       "train", sms_cap=64)
    assert b.device == torch.device("cpu")
    try:
        report = scenarios(b, rank)
    finally:
        b.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
