"""Run under torchrun (gloo, CPU) by tests/test_check_reference.py. Each rank exercises the reference
backend and the Measurer's cross-rank reduction, and writes what it saw to OUT/rank<r>.json."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepep_tune.deepep.check import check_combine, check_dispatch  # noqa: E402
from deepep_tune.deepep.config import TuneConfig  # noqa: E402
from deepep_tune.deepep.workload import Workload  # noqa: E402
from deepep_tune.tune.backends.reference import ReferenceBackend  # noqa: E402
from deepep_tune.tune.measure import Measurer, MeasureSettings  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world": world}
    for dtype in ("bf16", "fp8"):
        w = Workload(num_tokens=48, hidden=256, num_topk=4, num_experts=4 * world, dispatch_dtype=dtype, seed=5)
        b = ReferenceBackend(w, rank, world, 64 << 20, "train")
        r = {}
        # a combine before any dispatch at that num_sms gets its handle from an untimed dispatch
        r["combine_first"] = b.measure("combine", TuneConfig(12, 3, 128), 0, 2).error
        r["dispatch"] = b.measure("dispatch", TuneConfig(8, 4, 128), 1, 2).error
        r["combine"] = b.measure("combine", TuneConfig(8, 1, 256), 1, 2).error
        # the real outputs, checked and then corrupted
        recv_x, recv_idx, recv_w, per_expert, handle, _ = b._dispatch(b.make_config(TuneConfig(8, 4, 128)))
        xs, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        r["n_recv"] = int(xs.shape[0])
        r["n_expected"] = int(b.expected.recv_values.numel())
        r["check_ok"] = check_dispatch(b.expected, xs, scales, recv_idx, recv_w, per_expert)
        if dtype == "bf16":
            bad = xs.clone()
            bad[-1] = (bad[-1].float() + 1).to(bad.dtype)
            r["check_corrupt"] = check_dispatch(b.expected, bad, None, recv_idx, recv_w, per_expert)
        else:
            sc = scales.clone()
            sc[-1] *= 2
            r["check_corrupt"] = check_dispatch(b.expected, xs, sc, recv_idx, recv_w, per_expert)
        combined, combined_w, _ = b._combine(b.make_config(TuneConfig(8, 1, 256)), handle)
        r["combine_check_ok"] = check_combine(b.expected, combined, b.own_values, combined_w, b.routing.topk_weights)
        try:
            b._combine(b.make_config(TuneConfig(16, 1, 256)), handle)
            r["handle_mismatch"] = None
        except (RuntimeError, AssertionError) as e:
            r["handle_mismatch"] = str(e)
        report[dtype] = r

    # the Measurer all-reduces: every rank records the same time for the same measurement
    w = Workload(num_tokens=48, hidden=256, num_topk=4, num_experts=4 * world)
    b = ReferenceBackend(w, rank, world, 64 << 20, "forward")
    m = Measurer(b, MeasureSettings(warmup=1, iters=3, timeout_s=30), rank, None)
    m.time("dispatch", TuneConfig(8, 4, 128))
    m.time("combine", TuneConfig(8, 1, 128))
    # a host-side failure (like a DeepEP assert) is recorded on every rank with each rank's error
    os.environ["DEEPEP_TUNE_INJECT"] = "raise@dispatch:16,4,128"
    m.time("dispatch", TuneConfig(16, 4, 128))
    del os.environ["DEEPEP_TUNE_INJECT"]
    m.time("dispatch", TuneConfig(16, 6, 128))
    report["records"] = m.records
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
