"""DeepEP V2's intranode kernels through deep_ep.ElasticBuffer (main @dd758ca, package 2.1.0). API facts and
file:line references: benchmarks/next_gen/API_NOTES.md; the call patterns are those of benchmarks/next_gen/
probe.py, which ran correctly on 2x H200.

What differs from the v1 backend (TokenBackend):
- one knob, num_sms, passed to every call; the combine's may differ from its handle's dispatch (deepep/elastic.py);
- every new num_sms JIT-compiles three kernels (non-cached dispatch, cached dispatch, combine; ~4-6 s each): the
  first call of each is made and timed on the host outside the timed iterations, and the seconds are reported;
- received rows are not in (source rank, token) order: each row's source comes from handle.recv_src_metadata, so
  the inputs carry their source token in their values (stamp_rows) and the checks decode them row by row;
- the MoE layer check (--layer-check) makes torchtitan main's calls through tune/layer_comm.ElasticComm.

On a CPU-only machine with tests/fake_v2 on PYTHONPATH (a stand-in that marks itself CPU_STAND_IN) the same
class runs on CPU over gloo, which is how tests/test_elastic_backend.py exercises it."""

from __future__ import annotations

import ctypes
import os
import platform
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from ...deepep.elastic import V2
from ...deepep.gpus import gpu_error
from ...deepep.gpus import sms_cap as gpu_sms_cap
from ...deepep.routing import Expected, expected_for_rank, make_routing
from ...deepep.workload import FP8_BLOCK, Workload
from ...knobs import Knobs, KnobSpace, Space
from ..setup import UsageError, sweep_space
from ..timing import CudaEventTimer, Timer, bench_parts, wall_timer
from .base import Backend, LocalResult
from .deepep import L2_FLUSH_BYTES, driver_version, local_device, nvidia_topology

# Columns 0-3 carry the source token in base 16, the others the source rank + 1: every value is an integer
# below 16, exact in bf16 and in fp8 e4m3 (times a power-of-two scale), and so is a combine's sum of up to 8
# copies whatever order the kernel adds them in. So every received row names its source exactly.
TOKEN_DIGITS = 4
MAX_STAMPED_TOKENS = 16 ** TOKEN_DIGITS
# Device waits in V2 trap after num_gpu_timeout_secs; the CPU waits for the dispatch counts up to
# num_cpu_timeout_secs. Both must outlast a peer that is still JIT-compiling the same kernel (~6 s), as in probe.py.
V2_TIMEOUT_S = 60


# --- inputs and checks -----------------------------------------------------------------------------------
def stamp_rows(src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int) -> torch.Tensor:
    """float32 [n, hidden]: the rows that source (rank, token) pairs send (see TOKEN_DIGITS)."""
    rows = (src_rank + 1).to(torch.float32)[:, None].expand(-1, hidden).clone()
    for d in range(TOKEN_DIGITS):
        rows[:, d] = ((src_token >> (4 * d)) & 15).to(torch.float32)
    return rows


def rows_of_ids(ids: torch.Tensor, max_tokens: int, hidden: int) -> torch.Tensor:
    """The rows of global source ids (src_rank * num_max_tokens_per_rank + src_token, V2's metadata)."""
    return stamp_rows(ids // max_tokens, ids % max_tokens, hidden)


def to_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [T, H], float32 scales [T, H/128]) whose product is rows exactly: row t is scaled by 2^(t%4),
    so a scale that travels with the wrong row shows."""
    exp = (torch.arange(rows.shape[0], device=rows.device) % 4).to(torch.float32)
    data = (rows * torch.exp2(exp)[:, None]).to(torch.float8_e4m3fn)
    scales = torch.exp2(-exp)[:, None].expand(-1, rows.shape[1] // FP8_BLOCK).contiguous()
    return data, scales


def dequant(recv_x: Any) -> torch.Tensor:
    if not isinstance(recv_x, tuple):
        return recv_x.float()
    data, scales = recv_x
    return data.float() * scales.float().repeat_interleave(FP8_BLOCK, dim=1)[:, :data.shape[1]]


def check_rows(got: torch.Tensor, ids: torch.Tensor, max_tokens: int) -> str | None:
    """Row i of got must be the row of source ids[i] (built where got is: thousands of rows x hidden)."""
    want = rows_of_ids(ids.to(got.device), max_tokens, got.shape[1])
    ok = (got == want).all(dim=1)
    if bool(ok.all()):
        return None
    bad = int((~ok).nonzero()[0])
    src = int(ids[bad])
    return f"received row {bad} should be token {src % max_tokens} of rank {src // max_tokens} but has other data"


def check_dispatch(exp: Expected, exp_ids: torch.Tensor, max_tokens: int, alignment: int, recv_x: Any,
                   recv_idx: torch.Tensor | None, recv_w: torch.Tensor | None, handle: Any) -> str | None:
    """A non-cached dispatch against the routing: the received set (from the handle's metadata), every row's
    data, the local top-k indices and weights, and the per-expert counts (aligned)."""
    xs = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    n = exp_ids.numel()
    if xs.shape[0] != n:
        return f"received {xs.shape[0]} tokens, expected {n}"
    src = handle.recv_src_metadata[:n, 0].long().cpu()
    order = torch.argsort(src)
    if not torch.equal(src[order], exp_ids):
        return "handle.recv_src_metadata names other tokens than the routing sends to this rank"
    err = check_rows(dequant(recv_x), src, max_tokens)
    if err:
        return err
    if recv_idx is not None and not torch.equal(recv_idx.cpu().long()[order], exp.recv_topk_idx):
        return "received top-k expert indices differ from the routing"
    if recv_w is not None:
        # V2 leaves the weights of slots whose expert lives elsewhere unspecified (its test masks them too)
        got = recv_w.cpu().float()[order].masked_fill(exp.recv_topk_idx < 0, 0)
        if not torch.allclose(got, exp.recv_topk_weights):
            return "received top-k weights differ from the routing"
    want = [-(-c // alignment) * alignment for c in exp.num_recv_per_expert]
    if list(handle.num_recv_tokens_per_expert_list) != want:
        return f"per-expert counts {list(handle.num_recv_tokens_per_expert_list)[:8]}... differ from {want[:8]}..."
    return None


def check_combine(combined: torch.Tensor, own_rows: torch.Tensor, copies: torch.Tensor,
                  combined_w: torch.Tensor | None, own_w: torch.Tensor) -> str | None:
    """Combine sums the copies of each token: row t must be its own row times the ranks it went to."""
    want = (own_rows * copies.to(own_rows.device, torch.float32)[:, None]).to(torch.bfloat16).float()
    ok = (combined.float() == want).all(dim=1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        return f"combined row {bad} is not its token times its {int(copies[bad])} copies"
    if combined_w is not None and not torch.allclose(combined_w.cpu().float(), own_w, atol=1e-6):
        return "combined top-k weights differ from the originals"
    return None


# --- the process group ---------------------------------------------------------------------------------
def buffer_group(device: torch.device) -> dist.ProcessGroup:
    """The group the ElasticBuffer communicates on, beside the tuner's default gloo group.

    V2 borrows torch's NCCL communicator (get_nccl_comm_handle, deep_ep/utils/comm.py:42-75: with
    EP_REUSE_NCCL_COMM=1, the default, it takes group._get_backend(cuda)._comm_ptr()). A NCCL group made beside a
    gloo default group is lazy: its communicator only exists after a first collective, and V2 would be handed a
    null one. device_id= makes torch connect it now (eager init, as probe.py's default group did) and a one-element
    all_reduce guarantees it on any torch. EP_REUSE_NCCL_COMM=0 is no simpler: V2 then builds a second
    communicator, exchanging its unique id with all_gather_object over this same group, which initialises torch's
    communicator anyway (and that path did not run on GPU)."""
    if device.type != "cuda":
        return dist.new_group(backend="gloo")  # the CPU stand-in moves rows with gloo
    try:
        group = dist.new_group(backend="nccl", device_id=device)
    except TypeError:  # a torch without new_group(device_id=): the all_reduce below connects it
        group = dist.new_group(backend="nccl")
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe, group=group)
    torch.cuda.synchronize(device)
    backend = group._get_backend(torch.device("cuda"))
    if hasattr(backend, "_comm_ptr") and not backend._comm_ptr():
        raise RuntimeError("the NCCL group for DeepEP V2 has no communicator after an all_reduce")
    return group


def theoretical_sms(buffer: Any, num_experts: int, num_topk: int, nvlink_gbs: float) -> dict[str, int]:
    """get_theoretical_num_sms at prefer_overlap_with_compute True and False, as probe.py computed them: the
    method reads the buffer's attribute, and its cache ignores it, so the second call passes other arguments."""
    assert buffer.prefer_overlap_with_compute
    overlap = int(buffer.get_theoretical_num_sms(num_experts, num_topk))
    buffer.prefer_overlap_with_compute = False
    try:
        no_overlap = int(buffer.get_theoretical_num_sms(num_experts, num_topk, nvlink_gbs=nvlink_gbs))
    finally:
        buffer.prefer_overlap_with_compute = True
    return {"True": overlap, "False": no_overlap}


def loaded_nccl() -> str | None:
    """Version and path of the libnccl mapped into this process (torch.cuda.nccl.version() reports the one torch
    was built with, not the 2.30.7 that benchmarks/next_gen/env.sh swaps in for V2)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libnccl" in line and "/" in line})
        if not paths:
            return None
        code = ctypes.c_int()
        ctypes.CDLL(paths[0]).ncclGetVersion(ctypes.byref(code))
        v = code.value
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100} ({paths[0]})"
    except (OSError, AttributeError, ValueError):
        return None


def is_stand_in(deep_ep: Any) -> bool:
    """tests/fake_v2 marks itself; the real package has no such attribute."""
    return bool(getattr(deep_ep, "CPU_STAND_IN", False))


# --- the backend -----------------------------------------------------------------------------------------
class ElasticBackend(Backend):
    """Times V2's dispatch/combine on one rank. Every measured config's output is checked; a combine uses the
    handle of a checked non-cached dispatch at its own num_sms, made once per num_sms and workload."""

    name = "deepep-v2"
    knob_space: KnobSpace = V2

    def __init__(self, workload: Workload, rank: int, num_ranks: int, local_rank: int, max_tokens: int,
                 objective: str, sms_cap: int | None, device: torch.device | None = None) -> None:
        import deep_ep  # imported here so that the package works without deep_ep installed

        self.deep_ep = deep_ep
        if device is None:
            device = torch.device("cpu") if is_stand_in(deep_ep) else torch.device("cuda", local_device(local_rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device, self.rank, self.num_ranks, self.objective = device, rank, num_ranks, objective
        self.sms_cap = sms_cap
        if max_tokens > MAX_STAMPED_TOKENS:
            raise ValueError(f"deepep-v2 checks stamp tokens in {TOKEN_DIGITS} hex digits: at most "
                             f"{MAX_STAMPED_TOKENS} tokens per rank, got {max_tokens}")
        self.max_tokens = max_tokens
        cuda = device.type == "cuda"
        self.timer: Timer = CudaEventTimer() if cuda else wall_timer
        # DeepEP's bench flushes L2 with a 256 MB memset before each timed call
        self.l2 = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if cuda else None
        self.flush: Callable[[], object] | None = self.l2.zero_ if self.l2 is not None else None
        self.first_call_s: dict[str, float] = {}
        # The same seconds plus their total, kept current: describe() hands out this very dict because the run
        # calls it beside the search, and the results are written after the last compile.
        self.jit_report: dict[str, float] = {"total": 0.0}
        self.group = buffer_group(device)
        t0 = time.perf_counter()
        # Sized for bf16 at the largest token count of the run: a bf16-sized buffer also serves fp8 dispatch
        # (API_NOTES §1), and one buffer serves every token count (num_max_tokens_per_rank is a kernel template
        # parameter, so a fixed value also keeps the JIT cache valid across token counts).
        self.buffer = deep_ep.ElasticBuffer(self.group, num_max_tokens_per_rank=max_tokens, hidden=workload.hidden,
                                            num_topk=workload.num_topk, use_fp8_dispatch=False,
                                            prefer_overlap_with_compute=True, explicitly_destroy=True,
                                            num_gpu_timeout_secs=V2_TIMEOUT_S, num_cpu_timeout_secs=V2_TIMEOUT_S)
        self.buffer_init_s = round(time.perf_counter() - t0, 2)
        from deep_ep.utils.envs import get_nvlink_gbs

        self.nvlink_gbs = float(get_nvlink_gbs())
        self.theoretical = theoretical_sms(self.buffer, workload.num_experts, workload.num_topk, self.nvlink_gbs)
        self.prepare(workload)

    # --- inputs ------------------------------------------------------------------------------------------
    def prepare(self, workload: Workload) -> None:
        """Inputs of a workload (the buffer is kept), then a first dispatch/combine at V2's own SM count: the
        one-off JIT work (epilogues, the first kernels) happens here, outside any measurement's hang watchdog."""
        self.workload = w = workload
        if w.num_tokens > self.max_tokens:
            raise ValueError(f"{w.num_tokens} tokens exceed the buffer's {self.max_tokens}")
        dev, r = self.device, self.num_ranks
        routings = [make_routing(w, s, r) for s in range(r)]
        self.routing = routings[self.rank]
        self.expected = expected_for_rank(w, self.rank, r, routings)
        self.expected_ids = torch.cat([s * self.max_tokens + rt.is_token_in_rank[:, self.rank].nonzero().flatten()
                                       for s, rt in enumerate(routings)])
        tokens = torch.arange(w.num_tokens, device=dev)
        self.own_rows = stamp_rows(torch.full_like(tokens, self.rank), tokens, w.hidden)
        self.x_bf16 = self.own_rows.to(torch.bfloat16)  # backward moves bf16 gradients whatever the forward dtype
        self.x: Any = to_fp8(self.own_rows) if w.dispatch_dtype == "fp8" else self.x_bf16
        self.topk_idx = self.routing.topk_idx.to(dev, getattr(self.deep_ep, "topk_idx_t", torch.int64))
        self.topk_weights = self.routing.topk_weights.to(dev)
        self.handles: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        warm = min(self.theoretical["True"], self.sms_cap or self.theoretical["True"])
        self._handle(warm)
        self._warm(f"combine@{warm}", lambda: self._combine(warm, self.handles[warm]))
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- the calls (probe.py's) ----------------------------------------------------------------------------
    def _dispatch(self, num_sms: int) -> tuple:
        return self.buffer.dispatch(self.x, topk_idx=self.topk_idx, topk_weights=self.topk_weights,
                                    num_experts=self.workload.num_experts,
                                    expert_alignment=self.workload.expert_alignment, num_sms=num_sms)

    def _cached_dispatch(self, num_sms: int, handle: Any) -> tuple:
        return self.buffer.dispatch(self.x_bf16, handle=handle, num_sms=num_sms)

    def _combine(self, num_sms: int, prepared: tuple[Any, torch.Tensor, torch.Tensor]) -> tuple:
        handle, rows, weights = prepared
        return self.buffer.combine(rows, handle, topk_weights=weights, num_sms=num_sms)

    # --- JIT: first calls ----------------------------------------------------------------------------------
    def _call(self, key: str, fn: Callable[[], Any]) -> Any:
        """fn(); the first call of each kernel variant (key, e.g. "dispatch@24") is synchronised and timed on the
        host: V2 JIT-compiles it inside that call (or loads it from its on-disk cache)."""
        if key in self.first_call_s:
            return fn()
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        self.first_call_s[key] = self.jit_report[key] = round(time.perf_counter() - t0, 3)
        self.jit_report["total"] = round(sum(self.first_call_s.values()), 2)
        return out

    def _warm(self, key: str, fn: Callable[[], Any]) -> Any:
        """The first call of a kernel variant, if it has not run yet (its result), else None. Every rank makes the
        same calls: the keys depend only on the sequence of configs, which all ranks share."""
        return None if key in self.first_call_s else self._call(key, fn)

    def _handle(self, num_sms: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(handle, combine rows, combine weights) of a checked non-cached dispatch at num_sms, made once per
        num_sms. The combine inputs follow the handle's receive order (row i: the token recv_src_metadata[i, 0])."""
        if num_sms in self.handles:
            return self.handles[num_sms]
        recv_x, recv_idx, recv_w, handle, _ = self._call(f"dispatch@{num_sms}", lambda: self._dispatch(num_sms))
        err = check_dispatch(self.expected, self.expected_ids, self.max_tokens, self.workload.expert_alignment,
                             recv_x, recv_idx, recv_w, handle)
        # decided together: a rank that kept a handle while its peer made another dispatch would hang both
        if any_rank(err is not None):
            raise RuntimeError(f"the dispatch at {num_sms} SMs that makes the combine's handle was wrong "
                               + (f"here: {err}" if err else "on another rank"))
        n = self.expected_ids.numel()
        src = handle.recv_src_metadata[:n, 0].long().cpu()
        rows = rows_of_ids(src.to(self.device), self.max_tokens, self.workload.hidden).to(torch.bfloat16)
        weights = self.expected.recv_topk_weights[torch.searchsorted(self.expected_ids, src)].to(self.device)
        self.handles[num_sms] = (handle, rows, weights)
        return self.handles[num_sms]

    # --- measuring -----------------------------------------------------------------------------------------
    def measure(self, op: str, cfg: Knobs, warmup: int, iters: int) -> LocalResult:
        n, names = int(cfg.num_sms), self.parts(op)
        out: dict[str, Any] = {}
        if op == "dispatch":
            first = self._warm(f"dispatch@{n}", lambda: self._dispatch(n))
            if "cached_dispatch" in names and f"cached_dispatch@{n}" not in self.first_call_s:
                handle = (first or self._dispatch(n))[3]
                self._call(f"cached_dispatch@{n}", lambda: self._cached_dispatch(n, handle))
            calls = {"dispatch": lambda: out.__setitem__("dispatch", self._dispatch(n)),
                     "cached_dispatch": lambda: out.__setitem__("cached", self._cached_dispatch(
                         n, out["dispatch"][3]))}
        else:
            prepared = self._handle(n)
            self._warm(f"combine@{n}", lambda: self._combine(n, prepared))
            calls = {name: (lambda name=name: out.__setitem__(name, self._combine(n, prepared)))
                     for name in ("combine", "combine_bwd")}
        samples = bench_parts([calls[p] for p in names], warmup=warmup, iters=iters, timer=self.timer,
                              before_each=self.flush)
        self._sync()
        return LocalResult(dict(zip(names, samples)), self._check(op, out))

    def _check(self, op: str, out: dict[str, Any]) -> str | None:
        """The last iteration's outputs against the routing (every part of the measurement)."""
        if op == "combine":
            for name in ("combine", "combine_bwd"):
                if name in out:
                    combined, combined_w, _ = out[name]
                    err = check_combine(combined, self.own_rows, self.expected.copies, combined_w,
                                        self.routing.topk_weights)
                    if err:
                        return f"{name}: {err}"
            return None
        recv_x, recv_idx, recv_w, handle, _ = out["dispatch"]
        err = check_dispatch(self.expected, self.expected_ids, self.max_tokens, self.workload.expert_alignment,
                             recv_x, recv_idx, recv_w, handle)
        if err is None and "cached" in out:
            n = self.expected_ids.numel()
            err = check_rows(dequant(out["cached"][0])[:n], handle.recv_src_metadata[:n, 0].long().cpu(),
                             self.max_tokens)
            err = err and f"cached dispatch: {err}"
        return err

    # --- what the run asks besides timings ------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        return {"theoretical_num_sms": dict(self.theoretical)}

    def identity(self) -> dict[str, Any]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU, deep_ep stand-in"
        return {"device_name": name, "num_devices": torch.cuda.device_count(), "colocated": False}

    def describe(self) -> dict[str, Any]:
        return describe_v2(self)

    def all_to_all(self, w: Workload, warmup: int, iters: int) -> dict[str, Any]:
        return {"skipped": "not wired for deepep-v2 (NCCL's all-to-all of the same rows: --backend deepep)"}

    def layer_check(self, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                    warmup: int, reference: str | None = None) -> dict[str, Any]:
        return v2_layer_check(self, shape, candidates, rounds, warmup, reference)

    def healthy(self) -> bool:
        """False once a failure has left a sticky CUDA error (a V2 device timeout traps: restart the process)."""
        try:
            self._sync()
            return True
        except RuntimeError:
            return False

    def close(self) -> None:
        self._sync()
        self.buffer.destroy()


# --- the MoE layer check (tune/layer.py) on this backend's buffer -------------------------------------------------
def v2_layer_check(b: ElasticBackend, shape: Any, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                   warmup: int, reference: str | None = None) -> dict[str, Any]:
    from ..layer import check_layer

    return check_layer(layer_library(b), shape, b.rank, b.num_ranks, b.device, candidates, rounds=rounds,
                       warmup=warmup, reference=reference)


def layer_library(b: ElasticBackend) -> Any:
    """The MoE layer's calls on b's buffer (tune/layer_comm.ElasticComm: torchtitan main's pattern), each
    candidate's num_sms per call. expert_alignment is the current workload's, as in the search, so the layer
    reuses the kernels the search compiled (it is a template parameter of all three kernels)."""
    from ..layer_comm import ElasticComm, LayerLibrary

    align = b.workload.expert_alignment if b.workload is not None else 1
    return LayerLibrary("deepep-v2", lambda d, c: ElasticComm(b.buffer, int(d.num_sms), int(c.num_sms), align),
                        lambda shape, d, c: layer_candidate_error(b, shape, d, c),
                        getattr(b.deep_ep, "topk_idx_t", torch.int64), jit=True, verify=True,
                        calls=dict(ElasticComm.CALLS))


def layer_candidate_error(b: ElasticBackend, shape: Any, d: Knobs, c: Knobs) -> str | None:
    """Why a (dispatch, combine) pair cannot run in the layer on b's buffer, or None: V2's host checks (num_sms > 0,
    <= the device's SMs: a violation would raise inside the ranks' shared call sequence) and the buffer's token
    capacity."""
    if shape.num_tokens > b.max_tokens:
        return f"{shape.num_tokens} tokens exceed the buffer's num_max_tokens_per_rank {b.max_tokens}"
    cap = b.sms_cap or device_sms(b)
    for op, cfg in (("dispatch", d), ("combine", c)):
        err = V2.error(op, cfg) or (f"num_sms={cfg.num_sms} exceeds {cap} SMs" if cfg.num_sms > cap else None)
        if err:
            return f"{op} {cfg}: {err}"
    return None


def device_sms(b: ElasticBackend) -> int:
    if b.device.type == "cuda":
        return int(torch.cuda.get_device_properties(b.device).multi_processor_count)
    return int(b.deep_ep.stand_in_device_sms())


def any_rank(flag: bool) -> bool:
    """flag on any rank (default group: the tuner's gloo control plane), so that all ranks act alike."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def describe_v2(self: ElasticBackend) -> dict[str, Any]:
    """The V2 backend's hardware and software facts, for the results file."""
    common = {"colocated": False, "sms_cap": self.sms_cap, "deep_ep": v2_version(self.deep_ep),
              "theoretical_num_sms": dict(self.theoretical), "nvlink_gbs_x0.9": self.nvlink_gbs,
              "buffer_bytes": getattr(self.buffer, "num_bytes", None), "buffer_init_s": self.buffer_init_s,
              "num_max_tokens_per_rank": self.max_tokens,
              "jit_compile_s": self.jit_report,  # live: see __init__
              "jit_note": "host seconds of the first call of each kernel variant (kind@num_sms): a JIT "
                          "compile, or a load from EP_JIT_CACHE_DIR when the variant was compiled before",
              "process_groups": f"ElasticBuffer on its own {'NCCL' if self.device.type == 'cuda' else 'gloo'} "
                                "group; tuner control on the default gloo group"}
    if self.device.type != "cuda":
        return {"device_name": f"CPU ({platform.processor() or platform.machine()}), deep_ep stand-in",
                "num_devices": 0, "device_sms": None, **common}
    return {"device_name": torch.cuda.get_device_name(self.device), "num_devices": torch.cuda.device_count(),
            "device_sms": torch.cuda.get_device_properties(self.device).multi_processor_count,
            "driver": driver_version(), "cuda": torch.version.cuda, "nccl_loaded": loaded_nccl(),
            "topology": nvidia_topology(), **common}

def v2_version(deep_ep: Any) -> str:
    v = f"deep_ep {getattr(deep_ep, '__version__', '?')} (V2 ElasticBuffer"
    commit = os.environ.get("DEEPEP_V2_COMMIT")  # the commit that was built (benchmarks/next_gen/run_v2.sh)
    return v + (f", commit {commit}" if commit else "") + f", {os.path.dirname(deep_ep.__file__)})"


def import_v2() -> Any:
    """deep_ep with ElasticBuffer, or a one-line UsageError saying what is missing. V2's own import asserts that
    torch loaded the very NCCL (>= 2.30.4) it was built with (deep_ep/__init__.py:46-68 @dd758ca)."""
    try:
        import deep_ep
    except (ImportError, AssertionError, RuntimeError, OSError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"DeepEP V2 does not load ({why}): it needs NCCL >= 2.30.4, built into it and loaded by "
                         "torch (source benchmarks/next_gen/env.sh v2; run under ng_with_v2_nccl)") from None
    if not hasattr(deep_ep, "ElasticBuffer"):
        raise UsageError(f"the installed deep_ep ({getattr(deep_ep, '__file__', '?')}) has no ElasticBuffer: "
                         "--backend deepep-v2 needs DeepEP main (V2, since 2026-04; benchmarks/next_gen/README.md)")
    return deep_ep


def hardware_sms_cap(o: Any, ranks: Any) -> int:
    """All SMs of the local GPU (V2 asserts num_sms <= device SMs, buffer.hpp:979). One rank per GPU: V2 needs a
    NCCL communicator, and NCCL refuses two ranks on one GPU."""
    deep_ep = import_v2()

    if is_stand_in(deep_ep):
        return int(deep_ep.stand_in_device_sms())
    if o.measurement.colocate:
        raise UsageError("--colocate is not possible with deepep-v2: its NCCL communicator needs one GPU per rank")
    err = gpu_error(ranks.world, torch.cuda.device_count(), False)
    if err:
        raise UsageError(err)
    props = torch.cuda.get_device_properties(local_device(ranks.local_rank))
    return gpu_sms_cap(props.multi_processor_count, 1)


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int) -> tuple[ElasticBackend, Space, int]:
    space, pruned = sweep_space(o, decl, ranks.world, sms_cap)
    b = ElasticBackend(o.shape, ranks.rank, ranks.world, ranks.local_rank, max(o.workload.num_tokens),
                       o.search.objective, sms_cap)
    return b, space, pruned
