"""Run under torchrun (gloo, CPU) by tests/test_hybrid_backend.py: the MoE layer check on HybridEP through the real
HybridBackend (built by its create()) and this folder's stand-in. Each rank writes what it saw to OUT/rank<r>.json
(the assertions live in the test)."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ["DEEPEP_TUNE_HYBRID_DEVICE"] = "cpu"

import hybrid_ep_cpp  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepep_tune.deepep.hybrid import HYBRID  # noqa: E402
from deepep_tune.deepep.workload import LayerShape  # noqa: E402
from deepep_tune.tune.backends import hybrid  # noqa: E402
from deepep_tune.tune.options import Options  # noqa: E402
from deepep_tune.tune.setup import Ranks  # noqa: E402

SHAPE = LayerShape(num_tokens=48, hidden=64, num_topk=4, num_experts=8, moe_intermediate=32, num_shared_experts=1,
                   shared_intermediate=48)
JIT_S, COLD_S = "0.3", "0.3"  # a compile, and each of the 2 slow launches after it


def pair(d, c):
    return HYBRID.config("dispatch", *d), HYBRID.config("combine", *c)


def backend():
    o = Options.of(num_tokens=(SHAPE.num_tokens,), hidden=SHAPE.hidden, num_topk=SHAPE.num_topk,
                   num_experts=SHAPE.num_experts, backend="hybridep", objective="train")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank(), ())
    b, _, _ = hybrid.create(o, ranks, HYBRID, hybrid.hardware_sms_cap(o, ranks))
    b.sms_cap = hybrid.hardware_sms_cap(o, ranks)
    return b


def watch_reallocations(b):
    """(changed, inside a dispatch) of every update_buffer: a re-allocation inside the timed dispatch is wrong."""
    log, state = [], {"in_dispatch": False}
    rt, buf = b.buffer.runtime, b.buffer
    update, dispatch = rt.update_buffer, buf.dispatch

    def logged_update(config):
        changed = update(config)
        log.append([bool(changed), state["in_dispatch"]])
        return changed

    def logged_dispatch(*a, **kw):
        state["in_dispatch"] = True
        try:
            return dispatch(*a, **kw)
        finally:
            state["in_dispatch"] = False

    rt.update_buffer, buf.dispatch = logged_update, logged_dispatch
    return log


def scenarios(b):
    cands = {"pick": pair((16, 128, 14), (8, 64, 12)), "titan": pair((16, 64, 10), (16, 64, 10)),
             "too_many": pair((64, 64, 10), (8, 64, 10))}
    rt = b.buffer.runtime
    r = {}
    reallocs = watch_reallocations(b)
    os.environ.update(FAKE_HYBRID_JIT_S=JIT_S, FAKE_HYBRID_COLD_CALLS="2", FAKE_HYBRID_COLD_S=COLD_S)
    start = len(rt.launches)
    # warmup=0: whatever warm-up runs before the timed rounds is the layer check's own
    r["result"] = b.layer_check(SHAPE, cands, rounds=2, warmup=0)
    r["launches"] = [list(x) for x in rt.launches[start:]]
    r["reallocations"] = reallocs
    for k in ("FAKE_HYBRID_JIT_S", "FAKE_HYBRID_COLD_CALLS", "FAKE_HYBRID_COLD_S"):
        os.environ.pop(k)
    hybrid_ep_cpp.HybridEPBuffer.corrupt_dispatch_row = 3  # every dispatch, forward and backward, on both ranks
    r["wrong_dispatch"] = b.layer_check(SHAPE, {"pick": cands["pick"]}, rounds=1, warmup=0)
    hybrid_ep_cpp.HybridEPBuffer.corrupt_dispatch_row = None
    # shared memory too small for 14 dispatch stages: HybridEP runs fewer, the layer check must say so
    smem, hybrid_ep_cpp.FAKE_MAX_SMEM = hybrid_ep_cpp.FAKE_MAX_SMEM, 64 * 2 * 12
    r["stages_lowered"] = b.layer_check(SHAPE, {"lowered": pair((8, 64, 14), (8, 64, 10))}, rounds=1, warmup=0)
    hybrid_ep_cpp.FAKE_MAX_SMEM = smem
    b.close()
    return r


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"rank": rank, **scenarios(backend())}
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
