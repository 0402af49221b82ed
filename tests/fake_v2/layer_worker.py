"""Run under torchrun (gloo, CPU, PYTHONPATH=tests/fake_v2:ROOT) by tests/test_elastic_backend.py: the MoE layer
check on DeepEP V2's ElasticBuffer through the real ElasticBackend and the deep_ep stand-in. Each rank writes what
it saw to OUT/rank<r>.json (the assertions live in the test). Every rank makes the same calls in the same order;
faults are injected on rank 0 only."""

import json
import os
import sys

import deep_ep
import torch
import torch.distributed as dist

import deepep_tune.tune.layer as layer_mod
from deepep_tune.deepep.elastic import V2
from deepep_tune.deepep.workload import LayerShape, Workload
from deepep_tune.tune.backends import elastic
from deepep_tune.tune.backends.elastic import ElasticBackend
from deepep_tune.tune.layer import MoELayer, layer_inputs

WORKLOAD = Workload(num_tokens=40, hidden=256, num_topk=4, num_experts=8, seed=3)
SHAPE = LayerShape(num_tokens=40, hidden=256, num_topk=4, num_experts=8, moe_intermediate=32, num_shared_experts=1,
                   shared_intermediate=48)
MAX_TOKENS = 64


def cfg(n):
    return V2.config("dispatch", n)


def calls_of(fn):
    start = len(deep_ep.CALLS)
    out = fn()
    return out, [list(c) for c in deep_ep.CALLS[start:]]


def with_fault(rank, name, fn):
    if rank == 0:
        deep_ep.FAULTS[name] = 10**6
    try:
        return fn()
    finally:
        deep_ep.FAULTS[name] = 0


def schedule_order(b, rank, world):
    """Where each schedule waits for the forward combine's event, relative to the shared experts."""
    log = []
    orig_ffn, orig_wait = layer_mod.dense_ffn, deep_ep.EventOverlap.current_stream_wait

    def ffn(*a):
        log.append("shared")
        return orig_ffn(*a)

    def wait(self):
        log.append("wait_combine")
        return orig_wait(self)

    layer_mod.dense_ffn, deep_ep.EventOverlap.current_stream_wait = ffn, wait
    try:
        comm = elastic.layer_library(b).comm_of(cfg(16), cfg(24))
        layer = MoELayer(SHAPE, rank, world, torch.device("cpu"))
        x, idx, tw, _ = layer_inputs(SHAPE, rank, world, 0, torch.device("cpu"), torch.bfloat16)
        out = {}
        for sched in ("sequential", "overlap"):
            log.clear()
            layer.run(x, idx, tw, comm, sched)
            out[sched] = list(log)
        return out
    finally:
        layer_mod.dense_ffn, deep_ep.EventOverlap.current_stream_wait = orig_ffn, orig_wait


def scenarios(b, rank, world):
    cands = {"pick": (cfg(16), cfg(24)), "other": (cfg(32), cfg(32)),
             "too_many": (cfg(deep_ep.stand_in_device_sms() + 2), cfg(8))}
    r = {}
    r["result"], r["calls"] = calls_of(lambda: b.layer_check(SHAPE, cands, rounds=2, warmup=1))
    os.environ["FAKE_V2_JIT_S"] = "0"  # the faulty runs compile nothing new that matters
    # a wrong combine on rank 0 in every call: one candidate only, so no other candidate's output disagrees with it
    r["wrong_combine"] = with_fault(rank, "combine_row", lambda: b.layer_check(
        SHAPE, {"pick": (cfg(16), cfg(24))}, rounds=1, warmup=0))
    r["wrong_dispatch"] = with_fault(rank, "dispatch_row", lambda: b.layer_check(
        SHAPE, {"pick": (cfg(16), cfg(24))}, rounds=1, warmup=0))
    r["schedule_order"] = schedule_order(b, rank, world)
    return r


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    b = ElasticBackend(WORKLOAD, rank, world, int(os.environ.get("LOCAL_RANK", "0")), MAX_TOKENS, "train", sms_cap=64)
    try:
        report = scenarios(b, rank, world)
    finally:
        b.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
