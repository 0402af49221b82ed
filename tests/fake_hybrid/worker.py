"""Run under torchrun (gloo, CPU) by tests/test_hybrid_backend.py: each rank builds the real HybridBackend through
its create() against this folder's stand-in of HybridEP, measures a few configs in scenarios, and writes what it
saw to OUT/rank<r>.json (the assertions live in the test)."""

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
from deepep_tune.tune.backends import hybrid  # noqa: E402
from deepep_tune.tune.options import Options  # noqa: E402
from deepep_tune.tune.setup import Ranks  # noqa: E402

SHAPE = dict(num_tokens=(48,), hidden=64, num_topk=4, num_experts=8)
COLD_S = 0.25  # each slow launch after a compile (tests/fake_hybrid/hybrid_ep_cpp.py FAKE_HYBRID_COLD_S)


def backend(objective):
    o = Options.of(**SHAPE, backend="hybridep", objective=objective)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank(), ())
    b, space, pruned = hybrid.create(o, ranks, HYBRID, hybrid.hardware_sms_cap(o, ranks))
    b.sms_cap = hybrid.hardware_sms_cap(o, ranks)
    return b, space


def measured(b, op, values, iters=3, warmup=1):
    """One measurement; what it returned and the kernels the fake launched meanwhile."""
    rt = b.buffer.runtime
    before = len(rt.launches)
    try:
        res = b.measure(op, HYBRID.config(op, *values), warmup=warmup, iters=iters)
        out = {"parts": {k: len(v) for k, v in res.parts.items()}, "error": res.error,
               "max_us": max(max(v) for v in res.parts.values())}
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        out = {"raised": f"{type(e).__name__}: {e}"}
    out["launches"] = sorted({tuple(x) for x in rt.launches[before:]})
    return out


def swap_same_value_rows(b):
    """Two received rows with the same value but different source tokens: only the (rank, token) stamp tells
    them apart, so swapping them tests the ordering check, not the value check."""
    ids, vals = b.inputs.expected_ids.tolist(), b.inputs.expected.recv_values.tolist()
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if vals[i] == vals[j] and ids[i] != ids[j]:
                return i, j
    raise AssertionError("no two received rows share a value")


def scenarios(rank):
    report = {}
    b, space = backend("train")
    report["space"] = {"dispatch": len(space.dispatch), "combine": len(space.combine),
                       "sms": space.sms_values()}
    report["facts"] = b.facts()
    report["dispatch"] = measured(b, "dispatch", (16, 128, 14))
    report["combine"] = measured(b, "combine", (8, 64, 12))
    report["reallocations"] = b.buffer.runtime.reallocations
    report["too_many_sms"] = measured(b, "dispatch", (64, 64, 10))
    # a dispatch row changed by one in the value columns
    hybrid_ep_cpp.HybridEPBuffer.corrupt_dispatch_row = 3
    report["corrupt_value"] = measured(b, "dispatch", (16, 64, 10))
    hybrid_ep_cpp.HybridEPBuffer.corrupt_dispatch_row = None
    # two rows with equal values swapped: the order is wrong, the values are not
    i, j = swap_same_value_rows(b)
    original = hybrid_ep_cpp.HybridEPBuffer.dispatch

    def swapped(self, **kw):
        out = original(self, **kw)
        out[0][[i, j]] = out[0][[j, i]]
        return out

    hybrid_ep_cpp.HybridEPBuffer.dispatch = swapped
    report["swapped_rows"] = measured(b, "dispatch", (16, 64, 10))

    def wrong_probs(self, **kw):
        out = original(self, **kw)
        if out[1] is not None:
            out[1][2] += 0.5
        return out

    hybrid_ep_cpp.HybridEPBuffer.dispatch = wrong_probs
    report["wrong_probs"] = measured(b, "dispatch", (16, 64, 10))
    hybrid_ep_cpp.HybridEPBuffer.dispatch = original
    # shared memory too small for 14 stages: HybridEP would run fewer; the backend must refuse the measurement
    smem = hybrid_ep_cpp.FAKE_MAX_SMEM
    hybrid_ep_cpp.FAKE_MAX_SMEM = 64 * 2 * 12
    report["stages_lowered"] = measured(b, "dispatch", (8, 64, 14))
    hybrid_ep_cpp.FAKE_MAX_SMEM = smem
    # the first launches after a compile run slow: a new config measured with no warm-up of the caller's (racing's
    # short pass) must still time only warm calls
    os.environ.update(FAKE_HYBRID_COLD_CALLS="2", FAKE_HYBRID_COLD_S=str(COLD_S))
    report["cold"] = measured(b, "dispatch", (32, 64, 14), warmup=0)
    report["cold_again"] = measured(b, "dispatch", (32, 64, 14), warmup=0)
    for k in ("FAKE_HYBRID_COLD_CALLS", "FAKE_HYBRID_COLD_S"):
        os.environ.pop(k)
    # JIT: a new config's first calls compile (the fake sleeps); the timings must not include it
    os.environ["FAKE_HYBRID_JIT_S"] = "0.3"
    report["jit"] = measured(b, "combine", (32, 128, 12))
    report["jit_again"] = measured(b, "combine", (32, 128, 12))
    os.environ.pop("FAKE_HYBRID_JIT_S")
    report["describe"] = b.describe()
    report["env_before_close"] = {k: os.environ.get(k) for k in hybrid.MANAGED_ENV}
    b.close()
    report["env_after_close"] = {k: os.environ.get(k) for k in hybrid.MANAGED_ENV}
    fwd, _ = backend("forward")
    report["forward_dispatch"] = measured(fwd, "dispatch", (24, 64, 10))
    report["forward_combine"] = measured(fwd, "combine", (24, 64, 10))
    fwd.close()
    return report


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.environ["NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API"] = "32"  # a user setting the backend overrides and restores
    report = {"rank": rank, "fake": getattr(__import__("deep_ep"), "FAKE", False), **scenarios(rank)}
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
