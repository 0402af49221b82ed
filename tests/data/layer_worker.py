"""Run under torchrun (gloo, CPU) by tests/test_layer.py: the MoE layer over the ReferenceBuffer against a plain
single-process MoE, and layer_check's interleaving and cross-rank reduction. Writes OUT/rank<r>.json."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import deepep_tune.tune.layer as layer_mod  # noqa: E402
from deepep_tune.deepep.buffer import align, nvl_bytes  # noqa: E402
from deepep_tune.deepep.config import RDMA_BUFFER, RDMA_CHUNK, TuneConfig  # noqa: E402
from deepep_tune.deepep.refbuffer import ReferenceBuffer, ReferenceConfig  # noqa: E402
from deepep_tune.deepep.workload import LayerShape  # noqa: E402
from deepep_tune.tune.layer import (  # noqa: E402
    MoELayer,
    full_weights,
    layer_check,
    layer_inputs,
    reference_check,
)

SHAPE = LayerShape(num_tokens=24, hidden=64, num_topk=3, num_experts=8, moe_intermediate=32, num_shared_experts=1,
                   shared_intermediate=48)
SEED = 4


def make_config(cfg):
    return ReferenceConfig(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)


class RecordingBuffer(ReferenceBuffer):
    """Logs the config of every forward dispatch, to check the order layer_check runs candidates in, and of every
    cached dispatch (the backward of the forward combine), to check that the backward is run."""

    log = []
    cached_log = []

    def dispatch(self, x, handle=None, **kw):
        if kw.get("config") is not None:
            c = kw["config"]
            (RecordingBuffer.log if handle is None else RecordingBuffer.cached_log).append(
                [c.num_sms, c.nvl_chunk, c.nvl_buffer])
        return super().dispatch(x, handle=handle, **kw)


class OrderBuffer(ReferenceBuffer):
    """Logs when the forward combine's event is waited on, to place it against the shared experts."""

    log = []

    def combine(self, x, handle, **kw):
        combined, w, event = super().combine(x, handle, **kw)
        wait = event.current_stream_wait

        def logged():
            OrderBuffer.log.append("wait_combine")
            wait()
        event.current_stream_wait = logged
        return combined, w, event


class FaultyBuffer(ReferenceBuffer):
    """Corrupts combine at num_sms 12: layer_check must notice that a config changed the layer's output."""

    def combine(self, x, handle, config=None, **kw):
        combined, w, event = super().combine(x, handle, config=config, **kw)
        if config is not None and config.num_sms == 12:
            combined = combined + 1
        return combined, w, event


def schedule_order(rank, world, need):
    """Where each schedule waits for the forward combine, relative to the shared experts."""
    buf = OrderBuffer(dist.group.WORLD, align(need))
    orig = layer_mod.dense_ffn

    def logged_ffn(*a):
        OrderBuffer.log.append("shared")
        return orig(*a)
    layer_mod.dense_ffn = logged_ffn
    try:
        cfg = make_config(TuneConfig(8, 4, 64))
        layer = MoELayer(SHAPE, rank, world, torch.device("cpu"), torch.bfloat16, SEED)
        x, idx, tw, _ = layer_inputs(SHAPE, rank, world, SEED, torch.device("cpu"), torch.bfloat16)
        out = {}
        for sched in ("sequential", "overlap"):
            OrderBuffer.log.clear()
            layer(x, idx, tw, buf, cfg, cfg, sched)
            out[sched] = list(OrderBuffer.log)
        return out
    finally:
        layer_mod.dense_ffn = orig


def faulty(rank, world, need):
    buf = FaultyBuffer(dist.group.WORLD, align(need))
    cands = {"deepep_as_shipped": (TuneConfig(20, 24, 256), TuneConfig(20, 10, 256)),
             "broken": (TuneConfig(12, 6, 128), TuneConfig(12, 3, 128))}
    res = layer_check(buf, make_config, SHAPE, rank, world, torch.device("cpu"), cands, rounds=1, warmup=0,
                      seed=SEED, schedules=("sequential",))
    return {"note": res.get("note"), "output_spread": res["output_spread"]}


def correctness(rank, world, buf):
    """layer.reference_check (what the GPU smoke runs on real DeepEP), plus schedule equality and weight layout."""
    cfg = TuneConfig(8, 4, 64)
    res = reference_check(buf, make_config, SHAPE, rank, world, torch.device("cpu"), cfg, cfg, seed=SEED,
                          experts_impls=("grouped_mm", "loop"))
    (w1, w3, w2), _ = full_weights(SHAPE, SEED, torch.device("cpu"), torch.bfloat16)
    lo, hi = rank * SHAPE.num_experts // world, (rank + 1) * SHAPE.num_experts // world
    layer = MoELayer(SHAPE, rank, world, torch.device("cpu"), torch.bfloat16, SEED)
    res["weights_match"] = all(torch.equal(getattr(layer, n), t[lo:hi]) for n, t in zip(("w1", "w3", "w2"),
                                                                                         (w1, w3, w2)))
    x, idx, tw, _ = layer_inputs(SHAPE, rank, world, SEED, torch.device("cpu"), torch.bfloat16)
    outs = [layer(x, idx, tw, buf, make_config(cfg), make_config(cfg), s) for s in ("sequential", "overlap")]
    res["schedules_equal"] = bool(torch.equal(outs[0], outs[1]))
    res["out_dtype"] = str(outs[0].dtype)
    res["out_norm"] = float(outs[0].detach().float().norm())
    return res


def timing(rank, world, buf):
    cands = {"deepep_as_shipped": (TuneConfig(20, 24, 256), TuneConfig(20, 10, 256)),
             "pick": (TuneConfig(8, 4, 64), TuneConfig(8, 2, 64)),
             "other": (TuneConfig(12, 6, 128), TuneConfig(12, 3, 128)),
             "mismatched_sms": (TuneConfig(8, 4, 64), TuneConfig(12, 2, 64)),
             "too_big": (TuneConfig(32, 4, 512), TuneConfig(32, 2, 512))}
    RecordingBuffer.log.clear()
    RecordingBuffer.cached_log.clear()
    res = layer_check(buf, make_config, SHAPE, rank, world, torch.device("cpu"), cands, rounds=4, warmup=1, seed=SEED)
    return {"result": res, "dispatch_log": list(RecordingBuffer.log), "cached_dispatch_log": list(RecordingBuffer.cached_log)}


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    w = SHAPE.workload()
    need = max(nvl_bytes(op, TuneConfig(20, 24, 256), world, w) for op in ("dispatch", "combine"))
    buf = RecordingBuffer(dist.group.WORLD, align(need))
    report = {"rank": rank, "correctness": correctness(rank, world, buf), "timing": timing(rank, world, buf),
              "schedule_order": schedule_order(rank, world, need), "faulty": faulty(rank, world, need)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
