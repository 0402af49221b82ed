#!/usr/bin/env python3
"""What a rank spends before its first measurement, step by step (run it the way the tuner's ranks run):

    torchrun --standalone --nproc_per_node 2 benchmarks/startup_probe.py [--deep-ep]

Prints, from rank 0, seconds since the process started for: import torch, CUDA context, the gloo process group
and its first collective, a NCCL group's first collective, import deep_ep and a deep_ep.Buffer (--deep-ep)."""

from __future__ import annotations

import os
import sys
import time

T0 = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepep_tune.tune.run import _process_start  # noqa: E402  (imports torch: the first step below)

STARTED = _process_start() or T0


def main() -> None:
    import torch
    import torch.distributed as dist

    marks = [("python up (interpreter start to this script)", T0), ("import torch + deepep_tune.tune.run", time.time())]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local % torch.cuda.device_count())
    torch.empty(1, device="cuda")
    marks.append(("CUDA context", time.time()))
    dist.init_process_group("gloo")
    dist.barrier()
    marks.append(("gloo process group + barrier", time.time()))
    nccl = dist.new_group(backend="nccl")
    dist.all_reduce(torch.ones(1, device="cuda"), group=nccl)
    torch.cuda.synchronize()
    marks.append(("NCCL group + first all_reduce", time.time()))
    if "--deep-ep" in sys.argv:
        import deep_ep

        marks.append(("import deep_ep", time.time()))
        buf = deep_ep.Buffer(dist.group.WORLD, 1 << 30, 0, low_latency_mode=False, num_qps_per_rank=1,
                             explicitly_destroy=True)
        marks.append(("deep_ep.Buffer(1 GiB NVL)", time.time()))
        buf.destroy()
    if dist.get_rank() == 0:
        last = STARTED
        for name, t in marks:
            print(f"{t - STARTED:7.2f} s  (+{t - last:5.2f})  {name}")
            last = t
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
