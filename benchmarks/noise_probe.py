"""Per-iteration timings of a few configs on every rank (GPU diagnostic for the timing method).
torchrun --standalone --nproc_per_node 2 benchmarks/noise_probe.py"""

import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_tune.deepep.config import TuneConfig  # noqa: E402
from deepep_tune.deepep.workload import Workload  # noqa: E402
from deepep_tune.tune.backends.deepep import DeepEPBackend  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
sms = int(os.environ.get("SMS", "64"))
b = DeepEPBackend(Workload(), rank, world, int(os.environ["LOCAL_RANK"]), dist.group.WORLD, 2 << 30, "forward")
for variant in ("flush", "noflush"):
    if variant == "noflush":
        b.flush = lambda: None
    for op, cfg in (("dispatch", TuneConfig(sms, 8, 256)), ("dispatch", TuneConfig(sms, 20, 128)),
                    ("combine", TuneConfig(sms, 7, 512)), ("combine", TuneConfig(sms, 14, 384))):
        for rep in range(3):
            r = b.measure(op, cfg, 2, 30)
            allr = [None] * world
            dist.all_gather_object(allr, r.parts[op])
            if rank == 0:
                per_iter_max = [max(x[i] for x in allr) for i in range(len(allr[0]))]
                print(variant, op, cfg, rep, "err", r.error)
                for k, x in enumerate(allr):
                    print(f"  rank{k}", " ".join(f"{v:.0f}" for v in x))
                s = sorted(per_iter_max)
                print(f"  iter-max median {s[len(s)//2]:.0f} mean {sum(s)/len(s):.0f} "
                      f"trim-mean {sum(s[3:-3])/len(s[3:-3]):.0f}; max-of-medians "
                      f"{max(sorted(x)[len(x)//2] for x in allr):.0f}")
b.close()
dist.destroy_process_group()
