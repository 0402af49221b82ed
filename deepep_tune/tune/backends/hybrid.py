"""NVIDIA HybridEP intranode kernels (deep_ep.HybridEPBuffer, DeepEP branch hybrid-ep @94a9f8f).

How a candidate is run (benchmarks/next_gen/API_NOTES.md §2, probe.py): a handle carries both ops' settings, fixed
at the non-cached dispatch that made it. So a measurement first sets the chunk/stage environment variables and
`configurer.buffer_config.num_of_blocks_{dispatch,combine}_api`, then makes a handle with an untimed non-cached
dispatch (the first call of a new config is where HybridEP JIT-compiles, 5-10 s; it is timed on the host and kept
out of the timings), then runs the new config's calls POST_COMPILE_WARMUP times untimed (reported apart) before
any timed call. A combine candidate's handle has the candidate's combine fields and HybridEP's defaults for
dispatch (and the reverse), so each op is measured at its own settings.

What is timed per iteration (base.OBJECTIVE_PARTS), as Megatron's HybridEP autograd functions call the kernels:
train: dispatch = forward dispatch with probs (non-cached: preprocessing, host sync, dispatch) + the backward's
cached dispatch of bf16 gradients with that handle; combine = forward combine + the dispatch's backward (a combine
that also reduces probs). forward: the dispatch with probs, the combine. Every output is checked.
The MoE layer check runs the same four calls per layer step through tune/layer_comm.HybridComm.

On CPU (DEEPEP_TUNE_HYBRID_DEVICE=cpu) the same class runs over gloo against tests/fake_hybrid, a stand-in of
deep_ep's HybridEPBuffer: that is how the tests run it; timings are then meaningless."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ...deepep.check import check_combine, check_dispatch
from ...deepep.gpus import gpu_error, sms_cap
from ...deepep.hybrid import (
    DEFAULT_CHUNK,
    DEFAULT_SMS,
    DEFAULT_STAGES,
    ENV,
    HANDLE_FIELD,
    HYBRID,
    SMS_FIELD,
    fits,
    settings_of,
)
from ...deepep.routing import Expected, expected_for_rank, make_routing, token_values
from ...deepep.workload import Workload
from ...knobs import OPS, SMS, Knobs, KnobSpace, Space
from ..setup import UsageError, sweep_space
from ..timing import CudaEventTimer, Timer, bench_parts, wall_timer
from .base import Backend, LocalResult
from .deepep import L2_FLUSH_BYTES, driver_version, local_device, nvidia_topology

HYBRID_EP_COMMIT = "94a9f8f"  # the DeepEP hybrid-ep commit this backend was written and probed against
CPU_ENV = "DEEPEP_TUNE_HYBRID_DEVICE"  # "cpu": run on CPU over gloo (against tests/fake_hybrid)
CPU_SMS_CAP = 32  # the fake has no SMs; sweep the grid of a small GPU, as the reference backend does
MANAGED_ENV = tuple(v for op in OPS for v in ENV[op].values())
# Untimed iterations of a new config's calls right after its JIT compile, before any timed one (see measure()).
POST_COMPILE_WARMUP = 3


@dataclass(frozen=True)
class Device:
    """Where the backend runs: the tensors' device, how a call is timed, the L2 flush, and a host sync."""

    device: torch.device
    timer: Timer
    flush: Callable[[], object] | None
    sync: Callable[[], None]
    sms: int  # SMs a kernel may use (device SMs; the CPU cap on CPU)
    name: str


def cpu_mode() -> bool:
    return os.environ.get(CPU_ENV, "").lower() == "cpu"


def cuda_device(local_rank: int) -> Device:
    idx = local_device(local_rank)
    torch.cuda.set_device(idx)
    dev = torch.device("cuda", idx)
    l2 = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=dev)  # DeepEP's bench: 256 MB memset
    return Device(dev, CudaEventTimer(), l2.zero_, torch.cuda.synchronize,
                  torch.cuda.get_device_properties(dev).multi_processor_count, torch.cuda.get_device_name(dev))


def cpu_device() -> Device:
    return Device(torch.device("cpu"), wall_timer, None, lambda: None, CPU_SMS_CAP,
                  f"CPU ({platform.processor() or platform.machine()})")


@dataclass(frozen=True)
class HandleSpec:
    """What a handle is made with: both ops' (num_sms, tokens_per_chunk, stages)."""

    dispatch: tuple[int, int, int]
    combine: tuple[int, int, int]

    @classmethod
    def of(cls, op: str, cfg: Knobs, default_sms: int) -> "HandleSpec":
        default = (default_sms, DEFAULT_CHUNK, DEFAULT_STAGES)
        mine = tuple(int(v) for v in cfg.values)
        return cls(mine, default) if op == "dispatch" else cls(default, mine)  # type: ignore[arg-type]

    def knobs(self, op: str) -> Knobs:
        return HYBRID.config(op, *getattr(self, op))

    def env(self) -> dict[str, int]:
        return {**settings_of("dispatch", self.knobs("dispatch")), **settings_of("combine", self.knobs("combine"))}

    def mismatch(self, config: Any) -> str | None:
        """Where the handle's HybridEpConfigInstance differs from what was asked (HybridEP lowers stages that do
        not fit shared memory; a setting that never reached the handle shows here too)."""
        for op in OPS:
            for knob, value in self.knobs(op).items:
                got = getattr(config, HANDLE_FIELD[op][knob])
                if got != value:
                    return f"HybridEP's handle has {HANDLE_FIELD[op][knob]}={got}, not the requested {value}"
        return None


@dataclass
class Inputs:
    """One workload's inputs on this rank and what every output must be."""

    x: torch.Tensor  # [T, H] bf16: cols 0-2 stamp (source rank, token % 256, token // 256 % 256), rest the value
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    expected: Expected
    expected_ids: torch.Tensor  # [N] source rank * 65536 + token % 65536, in HybridEP's receive order
    expected_probs: torch.Tensor  # [N, local experts] the routing weight of each received token per local expert
    own_values: torch.Tensor
    num_ranks: int
    combine_in: torch.Tensor  # [N, H] bf16: each received row's value (combine must return value x copies)


def stamp_ids(rank: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return rank * 65536 + token % 65536


def make_inputs(w: Workload, rank: int, num_ranks: int, device: torch.device) -> Inputs:
    routings = [make_routing(w, r, num_ranks) for r in range(num_ranks)]
    exp = expected_for_rank(w, rank, num_ranks, routings)
    t = torch.arange(w.num_tokens)
    values = token_values(rank, w.num_tokens).float()
    x = values[:, None].repeat(1, w.hidden)
    x[:, 0], x[:, 1], x[:, 2] = float(rank), (t % 256).float(), (t // 256 % 256).float()
    ids = [stamp_ids(torch.full_like(sel, src), sel) for src, rt in enumerate(routings)
           for sel in [rt.is_token_in_rank[:, rank].nonzero().flatten()]]
    local = exp.recv_topk_idx >= 0
    probs = torch.zeros(exp.recv_topk_idx.shape[0], w.num_experts // num_ranks)
    rows = torch.arange(probs.shape[0])[:, None].expand_as(exp.recv_topk_idx)
    probs[rows[local], exp.recv_topk_idx[local]] = exp.recv_topk_weights[local]
    bf16 = lambda a: a.to(device, torch.bfloat16).contiguous()  # noqa: E731
    return Inputs(bf16(x), routings[rank].topk_idx.to(device), routings[rank].topk_weights.to(device).contiguous(),
                  exp, torch.cat(ids), probs, values, num_ranks, bf16(exp.recv_values[:, None].expand(-1, w.hidden)))


def dispatch_error(inp: Inputs, recv_x: torch.Tensor, num_recv: int, recv_probs: torch.Tensor | None,
                   rank: int) -> str | None:
    """probe.py's check: rows in (source rank, source token) order, one per token with an expert on this rank."""
    if recv_x.shape[0] < num_recv:
        return f"dispatch returned {recv_x.shape[0]} rows but its handle counts {num_recv}"
    rows = recv_x[:num_recv]
    err = check_dispatch(inp.expected, rows[:, 3:], None, None, None, None)
    if err:
        return err
    f = rows[:, :3].float().cpu().round().long()
    got = stamp_ids(f[:, 0], f[:, 1] + 256 * f[:, 2])
    if not torch.equal(got, inp.expected_ids):
        bad = int((got != inp.expected_ids).nonzero()[0])
        return (f"received row {bad} is (rank {int(got[bad]) // 65536}, token {int(got[bad]) % 65536}), expected "
                f"(rank {int(inp.expected_ids[bad]) // 65536}, token {int(inp.expected_ids[bad]) % 65536})")
    return None if recv_probs is None else probs_error(inp, recv_probs[:num_recv], rank)


def probs_error(inp: Inputs, recv_probs: torch.Tensor, rank: int) -> str | None:
    """recv probs are [N, experts of the NVLink domain] (executor.cu): this rank's experts are its slice."""
    local = inp.expected_probs.shape[1]
    width = recv_probs.shape[1]
    if width % local or width // local not in (1, inp.num_ranks):
        return f"dispatch's probs have {width} columns, expected {local} or {local * inp.num_ranks}"
    mine = recv_probs[:, rank * local:(rank + 1) * local] if width > local else recv_probs
    if not torch.equal(mine.float().cpu(), inp.expected_probs):
        bad = int((mine.float().cpu() != inp.expected_probs).any(1).nonzero()[0])
        return f"dispatch's probs of received row {bad} differ from the routing weights of this rank's experts"
    return None


class HybridBackend(Backend):
    name = "hybridep"
    knob_space: KnobSpace = HYBRID

    def __init__(self, workload: Workload, rank: int, num_ranks: int, group: Any, objective: str, dev: Device,
                 deep_ep: Any, max_tokens: int) -> None:
        self.rank, self.num_ranks, self.objective, self.dev, self.deep_ep = rank, num_ranks, objective, dev, deep_ep
        self.user_env = {k: os.environ.get(k) for k in MANAGED_ENV}
        # Per config, seconds of its first calls (JIT compiles); describe() hands out these very dicts, kept
        # current, because the run calls it beside the search and writes the results after the last compile.
        self.first_call_s: dict[str, float] = {}
        self.first_call_total: dict[str, float] = {"total_s": 0.0, "configs": 0, "post_compile_warmup_s": 0.0}
        self.post_compile_warmup_s: dict[str, float] = {}  # per config: the untimed runs right after its compile
        self.spec: HandleSpec | None = None
        self.buffer = self._make_buffer(group, workload, max_tokens)
        self.use(workload)

    def _make_buffer(self, group: Any, w: Workload, max_tokens: int) -> Any:
        """One buffer for the run, sized for the largest token count. Built at HybridEP's default chunks (the
        Configurer reads them from the environment) and, where the device has that many SMs, without SM
        arguments, so facts() can report the installed library's own default."""
        self._set_env(HandleSpec.of("dispatch", HYBRID.config("dispatch", DEFAULT_SMS, DEFAULT_CHUNK,
                                                              DEFAULT_STAGES), DEFAULT_SMS).env())
        sms = {} if self.dev.sms >= DEFAULT_SMS else {"num_sms_dispatch_api": self.dev.sms,
                                                      "num_sms_combine_api": self.dev.sms}
        buf = self.deep_ep.HybridEPBuffer(group, hidden_dim=w.hidden, max_num_of_tokens_per_rank=max_tokens,
                                          num_local_experts=w.num_experts // self.num_ranks, use_fp8=False, **sms)
        if getattr(buf, "num_of_nodes", 1) != 1:
            raise UsageError(f"HybridEP sees {buf.num_of_nodes} NVLink domains among {self.num_ranks} ranks; this "
                             "backend tunes one node (NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN overrides detection)")
        self.ranks_per_domain = getattr(buf, "num_of_hybrid_ep_ranks_per_nvlink_domain", None)
        self.default_sms = int(buf.configurer.buffer_config.num_of_blocks_dispatch_api)
        self.buffer_config = repr(buf.configurer.buffer_config)
        return buf

    def prepare(self, workload: Workload) -> None:
        self.inputs = make_inputs(workload, self.rank, self.num_ranks, self.dev.device)
        self.workload = workload
        self.dev.sync()

    # --- setting a config ---------------------------------------------------------------------------------
    def _set_env(self, env: dict[str, int]) -> None:
        for k, v in env.items():
            os.environ[k] = str(v)

    def _apply(self, spec: HandleSpec) -> None:
        """Settings for the next non-cached dispatch: env vars (read per dispatch; a chunk change re-allocates,
        which is collective: every rank applies the same spec in the same order) and the SM counts (read, modify,
        assign back, as probe.py; no re-allocation)."""
        self._set_env(spec.env())
        c = self.buffer.configurer.buffer_config
        setattr(c, SMS_FIELD["dispatch"], spec.dispatch[0])
        setattr(c, SMS_FIELD["combine"], spec.combine[0])
        self.buffer.configurer.buffer_config = c
        self.spec = spec

    # --- the calls ----------------------------------------------------------------------------------------
    def _dispatch(self) -> tuple:
        inp, w = self.inputs, self.workload
        return self.buffer.dispatch(hidden=inp.x, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights,
                                    num_of_experts=w.num_experts)

    def _cached_dispatch(self, handle: tuple) -> tuple:
        # num_dispatched_tokens skips HybridEP's host sync (the count is known from the handle-making dispatch)
        return self.buffer.dispatch(hidden=self.inputs.x, num_of_experts=self.workload.num_experts, handle=handle,
                                    num_dispatched_tokens=self.num_recv)

    def _combine(self, handle: tuple, probs: torch.Tensor | None) -> tuple:
        return self.buffer.combine(hidden=self.inputs.combine_in, probs=probs, handle=handle)

    def _first(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """One call on the host clock with the device synchronized: where HybridEP JIT-compiles a new kernel."""
        self.dev.sync()
        t0 = time.perf_counter()
        out = fn()
        self.dev.sync()
        return out, time.perf_counter() - t0

    def _handle(self, spec: HandleSpec) -> tuple[tuple, float]:
        """Apply spec and make a handle with an untimed non-cached dispatch; check it carries the spec."""
        self._apply(spec)
        out, seconds = self._first(self._dispatch)
        handle = out[3]
        self.num_recv = int(handle[3].reshape(-1)[0])
        wrong = spec.mismatch(handle[6])
        if wrong:
            raise RuntimeError(wrong)
        return out, seconds

    def _calls(self, op: str, first: tuple, out: dict[str, Any]) -> dict[str, Callable[[], object]]:
        if op == "dispatch":
            return {"dispatch": lambda: out.__setitem__("dispatch", self._dispatch()),
                    "cached_dispatch": lambda: out.__setitem__("cached", self._cached_dispatch(out["dispatch"][3]))}
        handle, probs = first[3], first[1]
        return {"combine": lambda: out.__setitem__("combine", self._combine(handle, None)),
                "combine_bwd": lambda: out.__setitem__("combine_bwd", self._combine(handle, probs))}

    # --- measuring ----------------------------------------------------------------------------------------
    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        err = HYBRID.error(op, cfg)
        if err or int(getattr(cfg, SMS)) > self.dev.sms:
            # Never launch more blocks than SMs (HybridEP's own check is a C assert in its constructor only).
            raise ValueError(err or f"num_sms={getattr(cfg, SMS)} exceeds the device's {self.dev.sms} SMs")
        first, seconds = self._handle(HandleSpec.of(op, cfg, self.default_sms))
        out: dict[str, Any] = {"dispatch": first}
        calls = self._calls(op, first, out)
        names = self.parts(op)
        for n in names:  # each part's first call: a new kernel compiles here (cached dispatch, probs combine)
            seconds += self._first(calls[n])[1]
        key = f"{op} {cfg}"
        if key not in self.first_call_s:
            self.first_call_s[key] = round(seconds, 3)
            self.first_call_total["total_s"] = round(self.first_call_total["total_s"] + seconds, 2)
            self.first_call_total["configs"] += 1
            warm_after_compile(self, key, [calls[n] for n in names])
        samples = bench_parts([calls[n] for n in names], warmup=warmup, iters=iters, timer=self.dev.timer,
                              before_each=self.dev.flush)
        return LocalResult(dict(zip(names, samples)), self._check(op, out))

    def _check(self, op: str, out: dict[str, Any]) -> str | None:
        inp = self.inputs
        if op == "combine":
            for name in ("combine", "combine_bwd"):
                if name in out:
                    err = check_combine(inp.expected, out[name][0], inp.own_values, None, inp.topk_weights.cpu())
                    if err:
                        return f"{name}: {err}"
            return None
        recv_x, recv_probs, _, handle = out["dispatch"]
        err = dispatch_error(inp, recv_x, int(handle[3].reshape(-1)[0]), recv_probs, self.rank)
        if err is None and "cached" in out:
            err = dispatch_error(inp, out["cached"][0], self.num_recv, None, self.rank)
            err = err and f"cached dispatch: {err}"
        return err

    # --- what the run asks besides measurements -----------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        return {"default_sms": self.default_sms, "device_sms": self.dev.sms}

    def describe(self) -> dict[str, Any]:
        cuda = self.dev.device.type == "cuda"
        other = {k: v for k, v in os.environ.items() if k.startswith("NUM_OF_") and k not in MANAGED_ENV}
        return {
            "device_name": self.dev.name, "num_devices": torch.cuda.device_count() if cuda else 0,
            "device_sms": self.dev.sms if cuda else None, "colocated": False, "sms_cap": self.sms_cap,
            "driver": driver_version() if cuda else None, "cuda": torch.version.cuda,
            "deep_ep": f"hybrid-ep {HYBRID_EP_COMMIT} ({os.path.dirname(self.deep_ep.__file__)})",
            "hybridep_buffer_config": self.buffer_config, "hybridep_ranks_per_nvlink_domain": self.ranks_per_domain, "hybridep_default_sms": self.default_sms,
            "hybridep_other_env": other,  # HybridEP settings left at the user's values (not tuned here)
            "hybridep_first_call_s": self.first_call_s,  # per config: JIT compiles, outside the timings
            "hybridep_first_call_total": self.first_call_total,
            # per config: POST_COMPILE_WARMUP untimed runs of its calls right after the compile, outside the timings
            "hybridep_post_compile_warmup_s": self.post_compile_warmup_s,
            "topology": nvidia_topology() if cuda else None,
        }

    def identity(self) -> dict[str, Any]:
        """The log header's few facts, without describe()'s nvidia-smi calls."""
        cuda = self.dev.device.type == "cuda"
        return {"device_name": self.dev.name, "num_devices": torch.cuda.device_count() if cuda else 0,
                "colocated": False}

    def healthy(self) -> bool:
        try:
            self.dev.sync()
            return True
        except RuntimeError:
            return False

    def all_to_all(self, w: Workload, warmup: int, iters: int) -> dict[str, Any]:
        return {"skipped": "the NCCL all-to-all comparison is wired for DeepEP's Buffer only (tune/a2a.py); "
                           "not implemented for the hybridep backend"}

    def layer_check(self, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                    warmup: int, reference: str | None = None) -> dict[str, Any]:
        return hybrid_layer_check(self, shape, candidates, rounds, warmup, reference)

    def close(self) -> None:
        try:
            self.dev.sync()
        finally:
            for k, v in self.user_env.items():  # leave the environment as the run found it
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def warm_after_compile(b: HybridBackend, key: str, calls: list[Callable[[], object]]) -> None:
    """Run a new config's calls POST_COMPILE_WARMUP more times, untimed, on the host clock (reported apart).
    The first launches after a JIT compile can still be slow (module load, cold caches); the caller's warm-up
    may be 0 (racing's short pass), and then a config's first timed calls would pay for it and it would look
    slower in the search than in the final re-timing (the 2x H200 run's search and re-timing disagreed on the
    pick against torchtitan's 16/16; this is one suspected cause, not a measured one)."""
    def run() -> None:
        for _ in range(POST_COMPILE_WARMUP):
            for fn in calls:
                fn()

    seconds = b._first(run)[1]
    b.post_compile_warmup_s[key] = round(seconds, 3)
    # summed from the per-config values: rounding a running total at each step lost every 3 ms warm-up
    b.first_call_total["post_compile_warmup_s"] = round(sum(b.post_compile_warmup_s.values()), 3)


# --- the MoE layer check (tune/layer.py) on this backend's buffer -------------------------------------------------
def hybrid_layer_check(b: HybridBackend, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                       warmup: int, reference: str | None = None) -> dict[str, Any]:
    from ..layer import check_layer

    return check_layer(layer_library(b, shape), shape, b.rank, b.num_ranks, b.dev.device, candidates, rounds=rounds,
                       warmup=warmup, reference=reference)


def layer_library(b: HybridBackend, shape: Any) -> Any:
    """The MoE layer's calls on b's buffer (tune/layer_comm.HybridComm). A candidate's settings are applied as
    measure() applies them (_apply: SM counts into buffer_config, chunk/stage environment variables), both ops' at
    once: the handle of each step's non-cached dispatch carries them to all four calls."""
    from ..layer_comm import HybridComm, LayerLibrary

    def comm_of(d: Knobs, c: Knobs) -> HybridComm:
        spec = HandleSpec(tuple(int(v) for v in d.values), tuple(int(v) for v in c.values))  # type: ignore[arg-type]
        return HybridComm(b.buffer, lambda: b._apply(spec), spec.mismatch, b.rank, shape.num_tokens, shape.hidden)

    return LayerLibrary("hybridep", comm_of, lambda s, d, c: layer_candidate_error(b, s, d, c), torch.int64,
                        jit=True, verify=True, calls=dict(HybridComm.CALLS))


def layer_candidate_error(b: HybridBackend, shape: Any, d: Knobs, c: Knobs) -> str | None:
    """Why a pair cannot run in the layer: HybridEP's rules, the device's SMs (never launch more blocks than SMs),
    and stages that would not fit shared memory (HybridEP would silently run fewer)."""
    for op, cfg in (("dispatch", d), ("combine", c)):
        sms = int(getattr(cfg, SMS))
        err = (HYBRID.error(op, cfg) or (f"num_sms={sms} exceeds the device's {b.dev.sms} SMs" if sms > b.dev.sms
                                         else None)
               or fits(op, cfg, b.num_ranks, shape.workload(), 0))
        if err:
            return f"{op} {cfg}: {err}"
    return None


# --- the run's entry points (tune/setup.py create_backend) ----------------------------------------------------
def workload_refusal(o: Any) -> str | None:
    """What this backend cannot time, as one line."""
    w = o.shape
    if w.dispatch_dtype != "bf16":
        return ("--backend hybridep times bf16 dispatch only (Megatron and torchtitan refuse FP8 dispatch with "
                "HybridEP); use --dispatch-dtype bf16")
    if w.expert_alignment != 1:
        return "--expert-alignment is a DeepEP Buffer setting; HybridEP's plain dispatch has none (use 1)"
    if w.num_experts % 4:
        return f"HybridEP needs num_experts % 4 == 0 on one node (BufferConfig.is_valid), got {w.num_experts}"
    if o.measurement.colocate:
        return "--backend hybridep needs one GPU per rank (it maps its peers' buffers over NVLink); drop --colocate"
    return None


def hardware_sms_cap(o: Any, ranks: Any) -> int:
    if cpu_mode():
        return CPU_SMS_CAP
    err = gpu_error(ranks.world, torch.cuda.device_count(), False)
    if err:
        raise UsageError(err)
    props = torch.cuda.get_device_properties(local_device(ranks.local_rank))
    return sms_cap(props.multi_processor_count, 1)


def buffer_group(dev: Device) -> Any:
    """The group HybridEP uses: NCCL on GPUs (it all_gathers CUDA tensors on it) beside the tuner's gloo group,
    initialised eagerly with one all_reduce so that a broken NCCL set-up fails here, not inside HybridEP."""
    if dev.device.type != "cuda":
        return dist.new_group(backend="gloo")
    group = dist.new_group(backend="nccl")
    probe = torch.ones(1, device=dev.device)
    dist.all_reduce(probe, group=group)
    torch.cuda.synchronize()
    return group


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int) -> tuple[HybridBackend, Space, int]:
    err = workload_refusal(o)
    if err:
        raise UsageError(err)
    import deep_ep  # here, so that the package works without HybridEP installed

    if not hasattr(deep_ep, "HybridEPBuffer"):
        raise UsageError("the installed deep_ep has no HybridEPBuffer: install DeepEP's hybrid-ep branch "
                         "(benchmarks/next_gen/README.md; source benchmarks/next_gen/env.sh hybrid)")
    space, pruned = sweep_space(o, decl, ranks.world, sms_cap)
    dev = cpu_device() if cpu_mode() else cuda_device(ranks.local_rank)
    b = HybridBackend(o.shape, ranks.rank, ranks.world, buffer_group(dev), o.search.objective, dev, deep_ep,
                      max(o.workload.num_tokens))
    return b, space, pruned
