"""Where a MoE layer's forward time goes, by GPU kernel (torch.profiler), for DeepEP as shipped and a tuned
config: how much of the layer DeepEP's kernels are, and so how much tuning them can save.

    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_layer_profile.py RESULTS_EP2.json"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepep_tune.deepep.buffer import align, nvl_bytes  # noqa: E402
from deepep_tune.deepep.config import TuneConfig, deepep_default  # noqa: E402
from deepep_tune.knobs import OPS  # noqa: E402
from deepep_tune.deepep.workload import LayerShape  # noqa: E402
from deepep_tune.tune.layer import MoELayer, layer_inputs  # noqa: E402


def main() -> None:
    res = json.load(open(sys.argv[1]))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deep_ep

    dev = torch.device("cuda", torch.cuda.current_device())
    lc = res["layer_check"]["shape"]
    shape = LayerShape(**lc)
    w = shape.workload()
    nd, nc = res["normal_dispatch"], res["normal_combine"]
    pick = (TuneConfig(nd["num_sms"], nd["num_max_nvl_chunked_send_tokens"], nd["num_max_nvl_chunked_recv_tokens"]),
            TuneConfig(nc["num_sms"], nc["num_max_nvl_chunked_send_tokens"], nc["num_max_nvl_chunked_recv_tokens"]))
    shipped = (deepep_default("dispatch", world), deepep_default("combine", world))
    nbytes = align(max(nvl_bytes(op, c, world, w) for op in OPS for c in (*pick, *shipped)))
    buffer = deep_ep.Buffer(dist.group.WORLD, nbytes, 0, low_latency_mode=False, num_qps_per_rank=1,
                            explicitly_destroy=True)
    layer = MoELayer(shape, rank, world, dev)
    x, idx, tw, _ = layer_inputs(shape, rank, world, 0, dev, torch.bfloat16, deep_ep.topk_idx_t)
    mk = lambda c: deep_ep.Config(c.num_sms, c.nvl_chunk, c.nvl_buffer, 6, 128)  # noqa: E731
    for name, (d, c) in (("deepep_as_shipped", shipped), ("pick", pick)):
        cfgs = (mk(d), mk(c))
        with torch.no_grad():
            for _ in range(3):
                layer(x, idx, tw, buffer, *cfgs, "sequential")
            torch.cuda.synchronize()
            dist.barrier()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    layer(x, idx, tw, buffer, *cfgs, "sequential")
                torch.cuda.synchronize()
        by = defaultdict(float)
        for e in prof.key_averages():
            t = e.device_time_total / 5 / 1e3  # ms per layer forward
            k = e.key.lower()
            cat = ("deepep" if "intranode" in k or "notify" in k or "deep_ep" in k
                   else "gemm" if "gemm" in k or "cutlass" in k or "sm90" in k or "nvjet" in k else "other")
            by[cat] += t
        if rank == 0:
            print(f"{name} {d}/{c}: kernel ms per forward " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(by.items()))
                  + "; top: " + "; ".join(f"{e.key[:60]} {e.device_time_total / 5 / 1e3:.3f}"
                                           for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]),
                  flush=True)
    dist.barrier()
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
