"""MoE layer check on real DeepEP: one DeepSeek-V3 MoE layer, forward + backward, for a few configs.

    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_layer_smoke.py [--tokens 4096] [--rounds 5]

Each rank takes the GPU of its LOCAL_RANK. First a small layer runs through the real kernels and is compared
with a plain single-process MoE (output and gradients), then deepep_tune.layer.layer_check times the full-size
layer for every candidate, interleaved round by round; rank 0 prints the table (and writes --json)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepep_tune.deepep.workload import LayerShape  # noqa: E402
from deepep_tune.tune.layer import (candidate_error, grouped_mm_works, has_grouped_mm,  # noqa: E402
                                    layer_check, reference_check)
from deepep_tune.deepep.models import find_preset  # noqa: E402
from deepep_tune.deepep.config import RDMA_BUFFER, RDMA_CHUNK, TuneConfig, deepep_default  # noqa: E402
from deepep_tune.deepep.buffer import align, nvl_bytes  # noqa: E402

# bf16 layer vs a float32 reference from the same bf16 values: ~0.5 % on CPU; wrong routing is >> 2 %.
CHECK_TOLERANCE = 0.02


def candidates(num_ranks: int) -> dict[str, tuple[TuneConfig, TuneConfig]]:
    return {
        # DeepEP as shipped: Buffer.num_sms = 20 and its per-rank-count tables
        "deepep_as_shipped": (deepep_default("dispatch", num_ranks), deepep_default("combine", num_ranks)),
        # upstream test_intranode's config, widely pasted, for both ops
        "community_24_8_256": (TuneConfig(24, 8, 256), TuneConfig(24, 8, 256)),
        # best at 48 SMs in benchmarks/landscapes/h100_colocated_ep2_deepseekv3_full.jsonl (co-located H100)
        "landscape_best_48": (TuneConfig(48, 10, 512), TuneConfig(48, 14, 384)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DeepSeek-V3")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schedules", default="sequential,overlap")
    ap.add_argument("--skip-check", action="store_true", help="skip the small-layer correctness check")
    ap.add_argument("--json", default=None, help="rank 0 writes the result here")
    ap.add_argument("--backend", choices=("deepep", "reference"), default="deepep",
                    help="reference: the CPU ReferenceBuffer (a dry run of this script, no GPU)")
    ap.add_argument("--tiny", action="store_true", help="time a tiny layer instead of --model (dry runs)")
    ap.add_argument("--experts-impl", choices=("grouped_mm", "loop"), default=None,
                    help="routed experts via torch._grouped_mm or a per-expert loop (default: grouped_mm if its "
                         "forward and backward run here)")
    args = ap.parse_args()

    # DeepEP uses the group only for all_gather_object (IPC handles); gloo keeps NCCL kernels, which can starve
    # DeepEP's cooperative launches (DeepEP #496), off the GPUs.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "deepep":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        import deep_ep

        buffer_cls, config_cls, where = deep_ep.Buffer, deep_ep.Config, os.path.dirname(deep_ep.__file__)
        idx_t = getattr(deep_ep, "topk_idx_t", "n/a")
        device_name = torch.cuda.get_device_name(device)
    else:
        from deepep_tune.deepep.refbuffer import ReferenceBuffer, ReferenceConfig

        device, buffer_cls, config_cls, where, idx_t, device_name = (torch.device("cpu"), ReferenceBuffer,
                                                                    ReferenceConfig, "reference", "int64", "CPU")

    preset = find_preset(args.model)
    if preset is None or preset.moe_intermediate is None:
        raise SystemExit(f"unknown --model {args.model} or no expert FFN size")
    shape = LayerShape(args.tokens, preset.hidden, preset.num_topk, preset.num_experts, preset.moe_intermediate,
                       preset.num_shared_experts, preset.shared_intermediate)
    if args.tiny:
        shape = LayerShape(args.tokens, 256, preset.num_topk, 16 * world, 128, 1, 128)
    small = LayerShape(256, 512, preset.num_topk, 8 * world, 256, 1, 256)
    cands = candidates(world)
    w = shape.workload()
    num_nvl_bytes = align(max(nvl_bytes(op, cfg, world, wl) for d, c in cands.values()
                              for op, cfg in (("dispatch", d), ("combine", c)) for wl in (w, small.workload())))
    for name, (d, c) in cands.items():
        err = candidate_error(shape, d, c, world, num_nvl_bytes)
        if err and rank == 0:
            print(f"[layer] {name} will be skipped: {err}", flush=True)

    def make_config(cfg: TuneConfig) -> object:
        return config_cls(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)

    if rank == 0:
        print(f"[env] torch {torch.__version__}, deep_ep from {where}, topk_idx_t={idx_t}, {world} x {device_name}, "
              f"torch._grouped_mm: {has_grouped_mm()}, fwd+bwd here: {grouped_mm_works(device)}", flush=True)
        print(f"[env] shape {shape}; num_nvl_bytes {num_nvl_bytes}", flush=True)
    buffer = buffer_cls(dist.group.WORLD, num_nvl_bytes, 0, low_latency_mode=False, num_qps_per_rank=1,
                        explicitly_destroy=True)
    rc = 0
    try:
        if not args.skip_check:
            t0 = time.time()
            pair = cands["deepep_as_shipped"]
            impls = (args.experts_impl,) if args.experts_impl else None
            check = reference_check(buffer, make_config, small, rank, world, device, *pair, experts_impls=impls)
            errs = [None] * world
            dist.all_gather_object(errs, check["max_rel_err"])
            if rank == 0:
                print(f"[check] small layer {small} through {where} vs a plain MoE: max relative error per "
                      f"rank {['%.2e' % e for e in errs]} (tolerance {CHECK_TOLERANCE}), {time.time() - t0:.1f} s",
                      flush=True)
                for key, row in check.items():
                    if isinstance(row, dict):
                        print(f"[check]   rank0 {key}: " + ", ".join(f"{k}={v:.2e}" for k, v in row.items()
                                                                   if isinstance(v, float)), flush=True)
            if max(errs) > CHECK_TOLERANCE:
                rc = 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
        t0 = time.time()
        result = layer_check(buffer, make_config, shape, rank, world, device, cands, rounds=args.rounds,
                             warmup=args.warmup, schedules=tuple(args.schedules.split(",")),
                             experts_impl=args.experts_impl)
        peak = [None] * world
        dist.all_gather_object(peak, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
        if rank == 0:
            print_result(result, time.time() - t0, peak)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
        if "skipped" in result:
            rc = 1
    finally:
        dist.barrier()
        buffer.destroy()
        dist.destroy_process_group()
    return rc


def print_result(result: dict, seconds: float, peak_gib: list) -> None:
    from tabulate import tabulate

    if "skipped" in result:
        print(f"[layer] skipped: {result['skipped']}")
        return
    print(f"[layer] {result['what']}; {result['rounds']} rounds after {result['warmup']} warm-up, {seconds:.1f} s; "
          f"peak GPU memory per rank {['%.1f GiB' % p for p in peak_gib]}")
    for sched, table in result["schedules"].items():
        rows = [[name, result["num_sms"][name], f"{v['median_ms']:.3f}", f"{v['p10_ms']:.3f}-{v['p90_ms']:.3f}",
                 f"{v['speedup_vs_reference']:.3f}x ({v['speedup_p10']:.3f}-{v['speedup_p90']:.3f})",
                 " ".join(f"{t:.2f}" for t in v["rounds"])] for name, v in table.items()]
        print(f"\nschedule: {sched}")
        print(tabulate(rows, headers=["candidate", "num_sms", "median ms", "p10-p90 ms",
                                      f"{result['reference']} / candidate", "rounds ms"], tablefmt="simple"))
    for name, why in result["skipped_candidates"].items():
        print(f"[layer] skipped {name}: {why}")
    print(f"[layer] outputs agree across candidates within {result['output_spread']:.2e} (relative norm)")
    if result.get("note"):
        print(f"[layer] NOTE: {result['note']}")


if __name__ == "__main__":
    sys.exit(main())
