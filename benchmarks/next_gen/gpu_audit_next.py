"""Audit the DeepEP V2 / HybridEP consumers' real call patterns on the real library, without and with
deepep_tune's runtime apply, and print one verdict per consumer scenario.

    ( source benchmarks/next_gen/env.sh v2; ng_with_v2_nccl python3 -m torch.distributed.run --standalone \
        --nproc_per_node 2 benchmarks/next_gen/gpu_audit_next.py --backend v2 [RESULTS_deepep-v2.json] )
    ( source benchmarks/next_gen/env.sh hybrid; python3 -m torch.distributed.run --standalone \
        --nproc_per_node 2 benchmarks/next_gen/gpu_audit_next.py --backend hybrid [RESULTS_hybridep.json] )

Without a results file it makes one for the world size with values that differ from every consumer's own
choice (V2: dispatch 24, combine 20 SMs; HybridEP: dispatch 32 SMs / chunk 128 / 8 stages, combine 20 SMs /
chunk 128 / 6 G2S stages), so that each "without apply" scenario shows what the consumer does on its own.

The consumers are the transcriptions in tests/consumers/ (each names its repository, commit, file and lines):
  v2:     torchtitan main (torchtitan_deepep_v2), vLLM deepep_v2 (vllm_deepep_v2), SGLang deepep_v2 (sglang_deepep_v2)
  hybrid: torchtitan main (torchtitan_hybridep), Megatron-LM (megatron_hybridep)
Rank 0 prints "<consumer> (<scenario>): in effect / NOT in effect: <which SM count each op used instead of
the tuned one, and where it came from>" per scenario, and a summary; the exit code is 1 when a scenario whose outcome is known in advance (marked "expect") did
not come out that way, or raised. --fake runs the same on CPU against tests/fake_next_runtime (one process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import traceback
import warnings
from typing import Any, Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

FAKES = {"v2": os.path.join(ROOT, "tests", "fake_next_runtime", "v2"),
         "hybrid": os.path.join(ROOT, "tests", "fake_next_runtime", "hybrid")}
T, H, K, E = 128, 7168, 8, 256  # SGLang's V2 buffer holds 128 tokens per rank (its default cap)


class FakeGroup:
    def __init__(self, n: int) -> None:
        self.n = n

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return self.n


def default_results(backend: str, ep: int) -> dict:
    if backend == "v2":
        d, c = {"num_sms": 24}, {"num_sms": 20}
        knobs = {"dispatch": ["num_sms"], "combine": ["num_sms"]}
        library = "deepep-v2"
    else:
        d = {"num_sms": 32, "tokens_per_chunk": 128, "stages": 8}
        c = {"num_sms": 20, "tokens_per_chunk": 128, "g2s_stages": 6}
        knobs = {"dispatch": list(d), "combine": list(c)}
        library = "hybridep"
    return {"library": library, "ep_size": ep, "backend": "gpu_audit_next (made up: tests the plumbing)",
            "best": {"dispatch": d, "combine": c}, "space": {"knobs": knobs, "shared": []}}


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.fake = args.fake
        if self.fake:
            sys.path.insert(0, FAKES[args.backend])
            self.rank, self.world, self.device = 0, args.ranks, torch.device("cpu")
            self.group = FakeGroup(self.world)
        else:
            import torch.distributed as dist
            self.dist = dist
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.device = torch.device("cuda", local)
            self.group = dist.new_group(list(range(self.world)))
        self.results: list[tuple[str, str, Optional[str], str, bool]] = []  # name, status, expected, line, ok

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def tokens(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed + self.rank)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        top = torch.topk(torch.rand(T, E, generator=g), K, dim=-1)
        idx, w = top.indices.to(torch.int64), torch.softmax(top.values, -1).float()
        return x.to(self.device), idx.to(self.device), w.to(self.device)

    def barrier(self) -> None:
        if not self.fake:
            torch.cuda.synchronize()
            self.dist.barrier(group=self.group)

    def scenario(self, name: str, module: Any, results: Any, body: Callable[[], None],
                 expect: Optional[str] = None, expect_parts: Optional[set] = None) -> None:
        """Run body under an audit of `results`; record the verdict (and whether it is the expected one)."""
        a = module.audit(results, quiet=True)
        try:
            with a:
                body()
            v = a.verdict()
            status, line = v.status, v.line
            ok = expect is None or (status == expect and (expect_parts is None or set(v.parts) == expect_parts))
        except Exception as e:  # report and go on with the next scenario
            status, line, ok = "ERROR", f"{type(e).__name__}: {e}", False
            if self.rank == 0:
                traceback.print_exc()
        finally:
            self.barrier()
        head = line.split(": ", 1)[1] if ": " in line else line
        short = head.split(" for ep", 1)[1].split(": ", 1)[1] if " for ep" in head and ": " in head.split(" for ep", 1)[1] else head
        self.say(f"{name}: {status}: {short}" + ("" if expect is None else f"   [expect {expect}: "
                                                  f"{'ok' if ok else 'UNEXPECTED'}]"))
        self.results.append((name, status, expect, line, ok))


# ----------------------------------------------------------------------------------------------------------
# DeepEP V2 consumers


def run_v2(r: Runner, results_path: str) -> None:
    from deepep_tune.runtime import elastic
    from deepep_tune.record.results import load_tuned
    import importlib
    tuned = load_tuned(results_path, "deepep-v2")
    n, m = int(tuned.dispatch["num_sms"]), int(tuned.combine["num_sms"])
    r.say(f"deepep-v2 results {results_path}: ep{tuned.ep_size}, dispatch {n} SMs, combine {m} SMs")

    tt = importlib.import_module("consumers.torchtitan_deepep_v2")
    vl = importlib.import_module("consumers.vllm_deepep_v2")
    sg = importlib.import_module("consumers.sglang_deepep_v2")
    x, idx, w = r.tokens()

    def titan() -> None:
        try:
            tt.train_step(r.group, x, idx, w, E)
        finally:
            if tt._buffer is not None and not r.fake:
                tt._buffer.destroy()
            tt.reset()

    r.scenario("torchtitan (without apply)", elastic, results_path, titan)
    elastic.apply(results_path)
    r.scenario("torchtitan (apply)", elastic, results_path, titan, expect=elastic.IN_EFFECT)
    elastic.unapply()

    def vllm() -> None:
        mgr = vl.DeepEPV2All2AllManager(r.group, r.group)
        pf = vl.build(mgr, T, H, K, E)
        try:
            vl.forward_step(pf, x, idx, w)
            r.say(f"    vLLM max_sms_used() = {mgr.max_sms_used()}")
        finally:
            if not r.fake:
                pf.buffer.destroy()

    r.scenario("vllm (without apply)", elastic, results_path, vllm)
    elastic.apply(results_path)
    r.scenario("vllm (apply)", elastic, results_path, vllm, expect=elastic.IN_EFFECT)
    elastic.unapply()

    reuse = os.environ.get("EP_REUSE_NCCL_COMM")  # SGLang sets it to 0 with setdefault; put it back after

    def sglang() -> None:
        impl = sg.DeepEPv2Impl(r.group, K, E, H)
        try:
            sg.forward_step(impl, x, idx, w)
        finally:
            sg.DeepEPv2Buffer.destroy()
            gc.collect()

    r.scenario("sglang (without apply)", elastic, results_path, sglang)
    os.environ["SGLANG_DEEPEP_V2_NUM_SMS"] = str(n)
    r.scenario(f"sglang (SGLANG_DEEPEP_V2_NUM_SMS={n})", elastic, results_path, sglang,
               expect=elastic.IN_EFFECT if n == m else elastic.NOT_IN_EFFECT,
               expect_parts=None if n == m else {"combine_sms"})
    del os.environ["SGLANG_DEEPEP_V2_NUM_SMS"]
    elastic.apply(results_path, force=True)
    r.scenario("sglang (apply force=True)", elastic, results_path, sglang, expect=elastic.IN_EFFECT)
    elastic.unapply()
    if reuse is None:
        os.environ.pop("EP_REUSE_NCCL_COMM", None)
    else:
        os.environ["EP_REUSE_NCCL_COMM"] = reuse


# ----------------------------------------------------------------------------------------------------------
# HybridEP consumers


def run_hybrid(r: Runner, results_path: str) -> None:
    from deepep_tune.runtime import hybrid
    from deepep_tune.record.results import load_tuned
    import importlib
    tuned = load_tuned(results_path, "hybridep")
    d, c = dict(tuned.dispatch), dict(tuned.combine)
    r.say(f"hybridep results {results_path}: ep{tuned.ep_size}, dispatch {d}, combine {c}")
    tt = importlib.import_module("consumers.torchtitan_hybridep")
    mg = importlib.import_module("consumers.megatron_hybridep")
    from deep_ep.hybrid_ep_buffer import indices_to_map
    x, idx, w = r.tokens()

    def titan() -> None:
        try:
            tt.train_step(r.group, x, idx, w, E)
        finally:
            tt.reset()
            gc.collect()

    r.scenario("torchtitan (without apply)", hybrid, results_path, titan)
    hybrid.apply(results_path)
    r.scenario("torchtitan (apply)", hybrid, results_path, titan, expect=hybrid.IN_EFFECT)
    hybrid.unapply()

    routing_map, probs = indices_to_map(idx, w, T, E)

    def megatron(**config: Any) -> Callable[[], None]:
        def body() -> None:
            try:
                mg.reset_hybrid_ep_buffer()
                mg.train_step(r.group, mg.TransformerConfig(**config), x, routing_map, probs, E // r.world)
            finally:
                mg.reset_hybrid_ep_buffer()
                gc.collect()
        return body

    r.scenario("megatron (without apply)", hybrid, results_path, megatron())
    env = hybrid.env_of(hybrid.tuned_values(tuned))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    same = d["num_sms"] == c["num_sms"]
    r.scenario(f"megatron (--moe-flex-dispatcher-num-sms {d['num_sms']} + {' '.join(f'{k}={v}' for k, v in env.items())})",
               hybrid, results_path, megatron(moe_flex_dispatcher_num_sms=d["num_sms"]),
               expect=hybrid.IN_EFFECT if same else hybrid.NOT_IN_EFFECT, expect_parts=None if same else {"combine_sms"})
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    hybrid.apply(results_path)
    r.scenario("megatron (apply, --moe-flex-dispatcher-num-sms 16)", hybrid, results_path,
               megatron(moe_flex_dispatcher_num_sms=16), expect=hybrid.IN_EFFECT)
    hybrid.unapply()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", help="a deepep-v2 or hybridep results file (default: made up)")
    parser.add_argument("--backend", choices=("v2", "hybrid"), required=True)
    parser.add_argument("--fake", action="store_true", help="CPU, one process, tests/fake_next_runtime")
    parser.add_argument("--ranks", type=int, default=8, help="--fake only: the fake group's size")
    args = parser.parse_args()
    if not args.fake and not torch.cuda.is_available():
        parser.error("no CUDA device: use --fake for the CPU smoke run")
    r = Runner(args)
    warnings.filterwarnings("ignore", message=".*made up: tests the plumbing.*")
    path = args.results
    tmp = None
    if path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"gpu_audit_next_{args.backend}_{r.rank}_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(default_results(args.backend, r.world), f)
        path = tmp
    import deep_ep
    r.say(f"deep_ep from {os.path.dirname(deep_ep.__file__)}; {r.world} ranks; tokens {T}, hidden {H}, top-{K} of {E}")
    try:
        (run_v2 if args.backend == "v2" else run_hybrid)(r, path)
    finally:
        if tmp is not None:
            os.unlink(tmp)
    bad = [name for name, _, _, _, ok in r.results if not ok]
    r.say(f"summary: {len(r.results)} scenarios, {len(r.results) - len(bad)} as expected"
          + (f"; UNEXPECTED or failed: {', '.join(bad)}" if bad else ""))
    if not r.fake:
        r.dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
