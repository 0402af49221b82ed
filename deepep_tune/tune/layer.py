"""One MoE layer, forward + backward, on real DeepEP v1 (GPU), the ReferenceBuffer (CPU), DeepEP V2's ElasticBuffer
or HybridEP's HybridEPBuffer, timed for several candidate (dispatch, combine) configs interleaved round by round.

The layer follows torchtitan's DeepEP integration (torchtitan/distributed/deepep/deepep.py: v1 before 756213e,
from PRs #2107, #2296, #2310; V2 at b5bcd76):
- forward: a non-cached dispatch, routed experts, a combine;
- backward: the gradient of dispatch is a combine of the received-row gradients (carrying the top-k weight
  gradients), the gradient of combine is a cached dispatch of the output gradient with the forward's handle;
- the forward combine's wait is deferred so shared experts run while the library combines ("overlap";
  torchtitan's sync_combine); "sequential" waits at once, then runs the shared experts. A library whose combine
  cannot run beside the compute stream (HybridEP) has no "overlap" schedule, and the result says why;
- routed experts: tokens permuted into expert order, torch._grouped_mm over per-expert offsets with a SiLU-gated
  FFN (w1 gate, w3 up, w2 down), scaled by the routing weights, scattered back (torchtitan _permute_tokens,
  GroupedExperts._experts_forward, _unpermute_tokens).
The library calls sit behind tune/layer_comm.LayerComm (one implementation per library: which call each step
makes, with which of the candidate's settings, is documented there); this module is the model, the schedules,
the checks and the timing, once for all of them.
Unlike torchtitan every call here passes an explicit config (the candidate under test), and the routing is fixed
(deepep_tune.routing, DeepEP's test routing) instead of a learned router: the router GEMM is not timed, but the
routing weights get a gradient, so the backward combine carries top-k weights as in training.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..deepep.buffer import int32_overflow, nvl_bytes
from ..deepep.config import SUPPORTED_RANKS, ConfigArgs
from ..deepep.routing import make_routing
from ..deepep.workload import LayerShape, layer_shape_error
from ..knobs import Knobs
from ..stats import quantiles
from .layer_comm import GROUP_ALIGN  # noqa: F401 - its old home: tests and benchmarks import it from here
from .layer_comm import LayerComm, LayerLibrary, Received, ReferenceComm, V1Comm
from .timing import CudaEventTimer, round_order, wall_timer

SCHEDULES = ("sequential", "overlap")
# What layer_check times: forward + backward in both schedules, and the forward alone (sequential, no
# autograd), which is what an inference prefill or a forward-only experiment sees.
CHECKED = (*SCHEDULES, "forward_only")
OUTPUT_TOLERANCE = 1e-2


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


_GROUPED_MM_OK: dict[str, bool] = {}


def grouped_mm_works(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs forward and backward in bf16 on this device (older torch builds lack the
    op or its derivative; on CUDA it needs SM90/SM100 for the fast path and falls back to a loop elsewhere)."""
    key = str(device)
    if key not in _GROUPED_MM_OK:
        ok = has_grouped_mm()
        if ok:
            try:
                x = torch.randn(24, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
                w = torch.randn(2, 16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
                offs = torch.tensor([8, 24], device=device, dtype=torch.int32)
                y = grouped_ffn(x, w, w, w.transpose(-2, -1), offs)
                torch.autograd.grad(y, [x, w], torch.ones_like(y))
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


# --- deterministic weights -------------------------------------------------------------------------------
def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def init_expert_(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, expert: int, seed: int) -> None:
    """Fill one expert's weights in place: a function of (seed, global expert index) only, so a rank's local
    experts equal the same experts of a single-process reference. 1/sqrt(fan_in) keeps activations O(1)."""
    g = _generator(w1.device, seed * 1_000_003 + 7919 * expert + 17)
    with torch.no_grad():
        for w in (w1, w3, w2):
            w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]), generator=g)


def init_shared_(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, seed: int) -> None:
    init_expert_(w1, w3, w2, -1_000_000, seed)  # one id no routed expert has; identical on every rank


def expert_params(num: int, shape: LayerShape, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w1, w3 [num, F, H] and w2 [num, H, F], torchtitan's GroupedExperts layout (w1_EFD, w3_EFD, w2_EDF)."""
    f, h = shape.moe_intermediate, shape.hidden
    return (torch.empty(num, f, h, device=device, dtype=dtype), torch.empty(num, f, h, device=device, dtype=dtype),
            torch.empty(num, h, f, device=device, dtype=dtype))


def ffn_params(f: int, h: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense FFN: w1, w3 [F, H] and w2 [H, F]."""
    return (torch.empty(f, h, device=device, dtype=dtype), torch.empty(f, h, device=device, dtype=dtype),
            torch.empty(h, f, device=device, dtype=dtype))


def layer_inputs(shape: LayerShape, rank: int, num_ranks: int, seed: int, device: torch.device,
                 dtype: torch.dtype, idx_dtype: torch.dtype = torch.int64
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, topk_idx, topk_weights, grad_out) of one rank, reproducible on any rank (CPU generators)."""
    routing = make_routing(shape.workload(seed), rank, num_ranks)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * (rank + 1))
    x = torch.randn(shape.num_tokens, shape.hidden, generator=g)
    grad_out = torch.randn(shape.num_tokens, shape.hidden, generator=g) / math.sqrt(shape.hidden)
    return (x.to(device, dtype), routing.topk_idx.to(device, idx_dtype), routing.topk_weights.to(device),
            grad_out.to(device, dtype))


# --- the SiLU-gated FFN over groups ------------------------------------------------------------------------
def grouped_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor
                ) -> torch.Tensor:
    """torchtitan GroupedExperts._experts_forward: rows [offsets[e-1], offsets[e]) go through expert e.
    offsets: int32 cumulative counts, last = x.shape[0] (rows past it would be left uninitialised)."""
    h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets))
    h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)


def looped_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, counts: list[int]
               ) -> torch.Tensor:
    """The same per expert, for torch builds without torch._grouped_mm."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start:start + c]
        outs.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)
        start += c
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


def dense_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


# --- the communication as autograd Functions ------------------------------------------------------------------
@dataclass
class _Box:
    """Non-tensor outputs of the forward calls, shared with the layer and the backward (torchtitan keeps them in
    a handle cache)."""

    received: Received | None = None
    wait: Callable[[], None] = field(default=lambda: None)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                comm: LayerComm, box: _Box) -> tuple[torch.Tensor, torch.Tensor]:
        box.received = r = comm.dispatch(x, topk_idx, topk_weights, num_experts)
        ctx.comm, ctx.handle, ctx.x_dtype, ctx.w_dtype = comm, r.handle, x.dtype, topk_weights.dtype
        return r.x, r.topk_weights

    @staticmethod
    def backward(ctx: Any, grad_recv_x: torch.Tensor, grad_recv_w: torch.Tensor | None) -> tuple:
        # The gradient of dispatch is a combine of the received-row gradients, carrying the top-k weight gradients.
        w = grad_recv_w.float().contiguous() if grad_recv_w is not None else None
        grad_x, grad_w = ctx.comm.combine_backward(grad_recv_x.to(torch.bfloat16).contiguous(), w, ctx.handle)
        grad_w = grad_w.to(ctx.w_dtype) if grad_w is not None else None
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, comm: LayerComm, box: _Box) -> torch.Tensor:
        assert box.received is not None
        combined, box.wait = comm.combine(y, box.received.handle)  # the caller waits, maybe after shared experts
        ctx.comm, ctx.handle = comm, box.received.handle
        return combined

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        # The gradient of combine is a cached dispatch of the output gradient with the forward's handle.
        return ctx.comm.dispatch_backward(grad.to(torch.bfloat16).contiguous(), ctx.handle), None, None


# --- the layer ---------------------------------------------------------------------------------------------
class MoELayer(torch.nn.Module):
    """A rank's share of one MoE layer: num_experts/num_ranks routed experts and a replica of the shared ones."""

    def __init__(self, shape: LayerShape, rank: int, num_ranks: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0, experts_impl: str | None = None) -> None:
        super().__init__()
        err = layer_shape_error(shape, num_ranks)
        if err:
            raise ValueError(err)
        self.shape, self.rank, self.num_ranks = shape, rank, num_ranks
        self.num_local = shape.num_experts // num_ranks
        self.experts_impl = experts_impl or ("grouped_mm" if grouped_mm_works(device) else "loop")
        w1, w3, w2 = expert_params(self.num_local, shape, device, dtype)
        for i in range(self.num_local):
            init_expert_(w1[i], w3[i], w2[i], rank * self.num_local + i, seed)
        self.w1, self.w3, self.w2 = (torch.nn.Parameter(w) for w in (w1, w3, w2))
        self.shared: tuple[torch.nn.Parameter, ...] = ()
        if shape.shared_size:
            s1, s3, s2 = ffn_params(shape.shared_size, shape.hidden, device, dtype)
            init_shared_(s1, s3, s2, seed)
            self.s1, self.s3, self.s2 = (torch.nn.Parameter(w) for w in (s1, s3, s2))
            self.shared = (self.s1, self.s3, self.s2)

    def routed_experts(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor,
                       padded_counts: list[int]) -> torch.Tensor:
        """torchtitan's _permute_tokens -> grouped GEMMs -> weights -> _unpermute_tokens, with each expert's rows
        padded to GROUP_ALIGN (padded_counts: DeepEP's num_recv_tokens_per_expert_list at that alignment)."""
        dev, n = recv_x.device, recv_x.shape[0]
        idx = recv_idx.long()
        valid = idx >= 0
        expert_ids = idx[valid]
        token_ids = torch.arange(n, device=dev).unsqueeze(1).expand_as(idx)[valid]
        scores = recv_w[valid]
        order = torch.argsort(expert_ids, stable=True)
        expert_ids, token_ids, scores = expert_ids[order], token_ids[order], scores[order]
        # scatter_add, not bincount: bincount sizes its output from the data (a device-to-host sync on GPU)
        counts = torch.zeros(self.num_local, dtype=torch.int64, device=dev).scatter_add_(
            0, expert_ids, torch.ones_like(expert_ids))
        padded = torch.tensor(padded_counts, dtype=torch.int64, device=dev)
        # Row j of expert e's group lands at padded_start[e] + j.
        rank_in_group = torch.arange(expert_ids.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[expert_ids]
        dest = (torch.cumsum(padded, 0) - padded)[expert_ids] + rank_in_group
        total = sum(padded_counts)
        rows = recv_x.new_zeros(total, recv_x.shape[1]).index_copy(0, dest, recv_x.index_select(0, token_ids))
        if self.experts_impl == "grouped_mm":
            offsets = torch.cumsum(padded, 0, dtype=torch.int32)
            h = grouped_ffn(rows, self.w1, self.w3, self.w2, offsets)
        else:
            h = looped_ffn(rows, self.w1, self.w3, self.w2, padded_counts)
        weighted = h.index_select(0, dest) * scores.to(h.dtype).unsqueeze(1)
        return recv_x.new_zeros(n, recv_x.shape[1]).index_add(0, token_ids, weighted)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer: Any,
                dispatch_config: Any, combine_config: Any, schedule: str = "sequential") -> torch.Tensor:
        """The layer over a deep_ep.Buffer-like buffer (DeepEP v1, the reference) with one Config per op."""
        return self.run(x, topk_idx, topk_weights, V1Comm(buffer, dispatch_config, combine_config), schedule)

    def run(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, comm: LayerComm,
            schedule: str = "sequential") -> torch.Tensor:
        """The layer over any library's LayerComm (tune/layer_comm.py)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "overlap" and comm.no_overlap:
            raise ValueError(f"no overlap schedule: {comm.no_overlap}")  # never time a schedule that is not one
        box = _Box()
        recv_x, recv_w = _Dispatch.apply(x, topk_weights, topk_idx, self.shape.num_experts, comm, box)
        assert box.received is not None
        y = self.routed_experts(recv_x, box.received.topk_idx, recv_w, box.received.counts)
        out = _Combine.apply(y, comm, box)
        if schedule == "overlap":
            shared = dense_ffn(x, *self.shared) if self.shared else None  # runs while the library combines
            box.wait()
        else:
            box.wait()
            shared = dense_ffn(x, *self.shared) if self.shared else None
        return out if shared is None else out + shared


# --- the single-process reference ---------------------------------------------------------------------------
def reference_moe(shape: LayerShape, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, shared: tuple[torch.Tensor, ...] = ()
                  ) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * FFN_{idx[t,k]}(x[t]) + shared(x[t]), a loop over all experts with full weights."""
    out = torch.zeros_like(x)
    for e in range(shape.num_experts):
        tok, slot = torch.nonzero(topk_idx == e, as_tuple=True)
        if tok.numel():
            y = dense_ffn(x[tok], w1[e], w3[e], w2[e])
            out = out.index_add(0, tok, y * topk_weights[tok, slot].to(y.dtype).unsqueeze(1))
    return out + dense_ffn(x, *shared) if shared else out


def full_weights(shape: LayerShape, seed: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every routed expert's weights, and the shared ones, as MoELayer initialises them on any rank."""
    w1, w3, w2 = expert_params(shape.num_experts, shape, device, dtype)
    for e in range(shape.num_experts):
        init_expert_(w1[e], w3[e], w2[e], e, seed)
    shared: tuple[torch.Tensor, ...] = ()
    if shape.shared_size:
        shared = ffn_params(shape.shared_size, shape.hidden, device, dtype)
        init_shared_(*shared, seed)
    return (w1, w3, w2), shared


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def reference_check(buffer: Any, make_config: Callable[[Knobs], Any], shape: LayerShape, rank: int,
                    num_ranks: int, device: torch.device, dispatch: Knobs, combine: Knobs, seed: int = 0,
                    schedules: tuple[str, ...] = SCHEDULES, experts_impls: tuple[str, ...] | None = None
                    ) -> dict[str, Any]:
    """Relative errors of the layer (through `buffer`, at one config pair) against reference_moe, a plain loop
    over all experts in float32 from the same bf16 weights and inputs: output, input gradient, routing-weight
    gradient and this rank's expert-weight gradients (those sum every rank's tokens: the reference runs them
    all). Collective: every rank calls it alike. Only for small shapes: it holds every expert's weights."""
    impls = experts_impls or (("grouped_mm", "loop") if grouped_mm_works(device) else ("loop",))
    idx_dtype = _idx_dtype(buffer)
    (w1, w3, w2), shared = full_weights(shape, seed, device, torch.bfloat16)
    inputs = [layer_inputs(shape, r, num_ranks, seed, device, torch.bfloat16, idx_dtype) for r in range(num_ranks)]
    ref_w = [t.float().requires_grad_(True) for t in (w1, w3, w2)]
    ref_x = [inp[0].float().requires_grad_(True) for inp in inputs]
    ref_tw = [inp[2].clone().requires_grad_(True) for inp in inputs]
    ref_out = [reference_moe(shape, ref_x[r], inputs[r][1], ref_tw[r], *ref_w, tuple(t.float() for t in shared))
               for r in range(num_ranks)]
    torch.autograd.backward(ref_out, [inp[3].float() for inp in inputs])
    local = shape.num_experts // num_ranks
    lo, hi = rank * local, (rank + 1) * local
    x, idx, tw, gout = inputs[rank]
    dcfg, ccfg = make_config(dispatch), make_config(combine)
    out: dict[str, Any] = {}
    for impl in impls:
        layer = MoELayer(shape, rank, num_ranks, device, torch.bfloat16, seed, impl)
        for sched in schedules:
            xi, twi = x.clone().requires_grad_(True), tw.clone().requires_grad_(True)
            y = layer(xi, idx, twi, buffer, dcfg, ccfg, sched)
            g = torch.autograd.grad(y, [xi, twi, layer.w1, layer.w3, layer.w2], gout)
            out[f"{impl}_{sched}"] = {
                "out": _rel_err(y, ref_out[rank]), "grad_x": _rel_err(g[0], ref_x[rank].grad),
                "grad_topk_weights": _rel_err(g[1], ref_tw[rank].grad),
                **{f"grad_{n}": _rel_err(gw, rw.grad[lo:hi]) for n, gw, rw in zip(("w1", "w3", "w2"), g[2:], ref_w)},
                "param_grads_untouched": all(p.grad is None for p in layer.parameters()),
            }
        del layer
    out["max_rel_err"] = max(v for r in out.values() if isinstance(r, dict) for k, v in r.items()
                             if isinstance(v, float))
    return out


# --- timing -------------------------------------------------------------------------------------------------
def reduce_rounds(per_rank: list[dict[str, dict[str, list[float]]]], reference: str | None
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """per_rank[r][schedule][candidate] = that rank's ms per round. A round of a collective layer is as slow as
    its slowest rank: take the max over ranks per round, then median/p10/p90 over rounds. speedup_vs_reference
    = median over rounds of reference_ms / candidate_ms (>1: faster than the reference)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sched, table in per_rank[0].items():
        slowest = {name: [max(rank[sched][name][i] for rank in per_rank) for i in range(len(times))]
                   for name, times in table.items()}
        out[sched] = {}
        for name, rounds in slowest.items():
            s = quantiles(rounds)
            row: dict[str, Any] = {"median_ms": s["median"], "p10_ms": s["p10"], "p90_ms": s["p90"],
                                   "rounds": rounds}
            if reference in slowest:
                ratio = quantiles([a / b for a, b in zip(slowest[reference], rounds)])
                row.update(speedup_vs_reference=ratio["median"], speedup_p10=ratio["p10"], speedup_p90=ratio["p90"])
            out[sched][name] = row
    return out


def _idx_dtype(buffer: Any) -> torch.dtype:
    """deep_ep.topk_idx_t for real DeepEP, else int64 (the reference)."""
    pkg = sys.modules.get(type(buffer).__module__.split(".")[0])
    return getattr(pkg, "topk_idx_t", torch.int64)


def candidate_error(shape: LayerShape, d: Knobs, c: Knobs, num_ranks: int, num_nvl_bytes: int
                    ) -> str | None:
    """Why a (dispatch, combine) pair cannot run in the layer on this buffer, or None."""
    for op, cfg in (("dispatch", d), ("combine", c)):
        err = ConfigArgs.of(cfg).error()
        if err:
            return f"{op} {cfg}: {err}"
    if d.num_sms != c.num_sms:
        return f"dispatch and combine use num_sms {d.num_sms} and {c.num_sms}; a DeepEP handle ties them to one"
    w = shape.workload()
    for op, cfg in (("dispatch", d), ("combine", c)):
        need = nvl_bytes(op, cfg, num_ranks, w)  # the backward combine carries top-k weights: num_topk counts
        if need > num_nvl_bytes:
            return f"{op} {cfg} needs {need} NVL bytes, the buffer has {num_nvl_bytes}"
        err = int32_overflow(op, cfg, num_ranks, w)
        if err:
            return err
    return None


def layer_check(buffer: Any, make_config: Callable[[Knobs], Any], shape: LayerShape, rank: int, num_ranks: int,
                device: torch.device, candidates: dict[str, tuple[Knobs, Knobs]], rounds: int,
                warmup: int, schedules: tuple[str, ...] = CHECKED, seed: int = 0,
                reference: str | None = None, experts_impl: str | None = None) -> dict[str, Any]:
    """check_layer on a deep_ep.Buffer-like buffer (DeepEP v1, the reference buffer), configs from make_config."""
    lib = LayerLibrary("deepep", lambda d, c: V1Comm(buffer, make_config(d), make_config(c)),
                       lambda s, d, c: candidate_error(s, d, c, num_ranks, buffer.num_nvl_bytes), _idx_dtype(buffer),
                       group=buffer.group)
    return check_layer(lib, shape, rank, num_ranks, device, candidates, rounds, warmup, schedules, seed, reference,
                       experts_impl)


def check_layer(lib: LayerLibrary, shape: LayerShape, rank: int, num_ranks: int, device: torch.device,
                candidates: dict[str, tuple[Knobs, Knobs]], rounds: int, warmup: int,
                schedules: tuple[str, ...] = CHECKED, seed: int = 0, reference: str | None = None,
                experts_impl: str | None = None) -> dict[str, Any]:
    """Time forward + backward of one MoE layer for every candidate (dispatch config, combine config) and
    schedule, through the library's LayerComm. Every rank must call this with the same arguments: the call
    sequence is identical on all ranks. The weights are allocated once; weight gradients are computed (the
    backward's GEMMs are timed) but returned by torch.autograd.grad and dropped each step, never accumulated
    in .grad."""
    err = layer_shape_error(shape, num_ranks)
    if err:
        return {"skipped": err}
    skipped = {name: e for name, (d, c) in candidates.items() if (e := lib.candidate_error(shape, d, c))}
    runnable = {name: pair for name, pair in candidates.items() if name not in skipped}
    if not runnable:
        return {"skipped": "no candidate can run: " + "; ".join(f"{n}: {e}" for n, e in skipped.items())}
    if reference not in runnable:  # the caller names it (the library's layer_baselines); else the first candidate
        reference = next(iter(runnable))
    comms = {name: lib.comm_of(d, c) for name, (d, c) in runnable.items()}

    bench = _LayerBench(lib.idx_dtype, shape, rank, num_ranks, device, seed, experts_impl, comms)
    no_overlap = next(iter(comms.values())).no_overlap
    not_run = {"overlap": no_overlap} if no_overlap and "overlap" in schedules else {}
    schedules = tuple(s for s in schedules if s not in not_run)
    if lib.jit or lib.verify:
        norms, checks = bench.first_steps(bench.reference() if lib.verify else "not asked")
        warmup = max(warmup, JIT_WARMUP_ROUNDS) if lib.jit else warmup
    else:
        norms, checks = bench.output_norms(), {}
    mine = bench.time_rounds(schedules, rounds, warmup)
    # The only collective besides the layer's: every rank reaches it after the same sequence of layer calls.
    gathered: list[Any] = [None] * num_ranks
    dist.all_gather_object(gathered, [mine, norms, checks], group=lib.group)
    result = _layer_result(gathered, bench, runnable, skipped, reference, rounds, warmup)
    return _add_checks(result, [c for _, _, c in gathered], lib, not_run)


# A JIT library's first step of a candidate compiles its kernels; the first launches after a compile can still
# be slow (module load, cold caches), so at least this many untimed rounds run before the timed ones.
JIT_WARMUP_ROUNDS = 2
# Worst row error over the RMS row norm, candidate against the reference: bf16 rounding in a different summation
# order gives ~1e-3, a wrong, lost or misrouted row O(0.1-1).
VERIFY_TOLERANCE = 0.05


def row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over rows of |got_r - want_r| / RMS_r |want_r| (rows along the last dimension): unlike a relative norm,
    one wrong row among thousands still shows. 1e9 for a shape mismatch or a non-finite value."""
    if got.shape != want.shape:
        return 1e9
    g = got.detach().float().reshape(-1, got.shape[-1]) if got.dim() else got.detach().float().reshape(1, 1)
    w = want.detach().float().reshape(g.shape).to(g.device)
    if g.numel() == 0:
        return 0.0
    rms = w.norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)
    err = float((g - w).norm(dim=1).max() / rms)
    return err if math.isfinite(err) else 1e9


def _reference_unavailable(num_ranks: int) -> str | None:
    """Why ReferenceComm cannot run here: it moves host copies over the default group, which must be gloo (the
    tuner's control plane), and the reference buffer takes DeepEP's intranode rank counts."""
    if dist.get_backend() != "gloo":
        return f"the default process group is {dist.get_backend()}, the reference exchange needs gloo"
    if num_ranks not in SUPPORTED_RANKS:
        return f"the reference buffer runs on {SUPPORTED_RANKS} ranks, not {num_ranks}"
    return None


class _LayerBench:
    """One layer, its inputs and a timer, shared by every candidate: the weights and inputs are allocated
    once so candidates differ only in their communication."""

    def __init__(self, idx_dtype: torch.dtype, shape: LayerShape, rank: int, num_ranks: int, device: torch.device,
                 seed: int, experts_impl: str | None, comms: dict[str, LayerComm]) -> None:
        self.shape, self.comms, self.num_ranks, self.device = shape, comms, num_ranks, device
        self.layer = MoELayer(shape, rank, num_ranks, device, torch.bfloat16, seed, experts_impl)
        self.x, self.topk_idx, self.topk_w, self.grad_out = layer_inputs(
            shape, rank, num_ranks, seed, device, torch.bfloat16, idx_dtype)
        self.x.requires_grad_(True)
        self.topk_w.requires_grad_(True)  # a router would get this gradient; the backward combine carries it
        self.wrt = [self.x, self.topk_w, *self.layer.parameters()]
        self.wrt_names = ["grad_x", "grad_topk_weights", *(f"grad_{n}" for n, _ in self.layer.named_parameters())]
        self.on_gpu = device.type == "cuda"
        self.timer = CudaEventTimer() if self.on_gpu else wall_timer

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def step(self, name: str, sched: str) -> None:
        comm = self.comms[name]
        if sched == "forward_only":
            with torch.no_grad():
                self.layer.run(self.x, self.topk_idx, self.topk_w, comm, "sequential")
            return
        out = self.layer.run(self.x, self.topk_idx, self.topk_w, comm, sched)
        grads = torch.autograd.grad(out, self.wrt, self.grad_out)
        del out, grads

    def run_untimed(self, name: str, sched: str) -> None:
        self.comms[name].activate()
        self.step(name, sched)

    def timed(self, name: str, sched: str) -> float:
        self.comms[name].activate()  # outside the timing: a library's per-candidate set-up (HybridEP's settings)
        return self.timer(lambda: self.step(name, sched)) / 1e3  # ms

    def grads(self, comm: LayerComm) -> dict[str, torch.Tensor]:
        """Output and every gradient of one sequential forward + backward through comm."""
        out = self.layer.run(self.x, self.topk_idx, self.topk_w, comm, "sequential")
        grads = torch.autograd.grad(out, self.wrt, self.grad_out)
        return {"out": out.detach(), **dict(zip(self.wrt_names, grads))}

    def reference(self) -> dict[str, torch.Tensor] | str:
        """The output and gradients through ReferenceComm (what a correct library gives), or why there are none."""
        why = _reference_unavailable(self.num_ranks)
        return why if why else self.grads(ReferenceComm(dist.group.WORLD, self.num_ranks, self.device))

    def output_norms(self) -> dict[str, float]:
        """Untimed: the layer's output must not depend on the config (only on the routing and the weights)."""
        norms = {}
        for name, comm in self.comms.items():
            comm.activate()
            with torch.no_grad():
                norms[name] = float(self.layer.run(self.x, self.topk_idx, self.topk_w, comm, "sequential")
                                    .float().norm())
        return norms

    def first_steps(self, ref: dict[str, torch.Tensor] | str) -> tuple[dict[str, float], dict[str, Any]]:
        """Each candidate's first forward + backward, before any round: where V2 and HybridEP JIT-compile its
        kernels (host seconds, reported apart), its output and gradients checked against the reference, and the
        library asked whether it ran the candidate's settings. Returns (output norms, this rank's checks)."""
        norms: dict[str, float] = {}
        checks: dict[str, Any] = {"first_call_s": {}, "errors": {}, "knobs": {},
                                  "reference": ref if isinstance(ref, str) else None}
        for name, comm in self.comms.items():
            comm.activate()
            self.sync()
            t0 = time.perf_counter()
            got = self.grads(comm)
            self.sync()
            checks["first_call_s"][name] = round(time.perf_counter() - t0, 3)
            norms[name] = float(got["out"].float().norm())
            if not isinstance(ref, str):
                checks["errors"][name] = {k: round(row_error(v, ref[k]), 6) for k, v in got.items()}
            problem = comm.check()
            if problem:
                checks["knobs"][name] = problem
            del got  # full-size expert-weight gradients: hold the reference's and one candidate's at a time
        return norms, checks

    def time_rounds(self, schedules: tuple[str, ...], rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
        """This rank's ms per round for every (schedule, candidate), after untimed warmup rounds; round_order
        interleaves the candidates so drift is spread over all of them."""
        units = [(sched, name) for sched in schedules for name in self.comms]
        for _ in range(warmup):
            for sched, name in units:
                self.run_untimed(name, sched)
        mine: dict[str, dict[str, list[float]]] = {s: {n: [] for n in self.comms} for s in schedules}
        for r in range(rounds):
            for sched, name in round_order(units, r):
                mine[sched][name].append(self.timed(name, sched))
        return mine


def _layer_result(gathered: list[Any], bench: _LayerBench, runnable: dict[str, tuple[Knobs, Knobs]],
                  skipped: dict[str, str], reference: str, rounds: int, warmup: int) -> dict[str, Any]:
    """The layer_check result from every rank's [times, output norms, checks]."""
    all_norms = [v for _, rank_norms, _ in gathered for v in rank_norms.values()]
    per_rank_spread = max((max(n.values()) - min(n.values())) / max(min(n.values()), 1e-12) for _, n, _ in gathered)
    impl = bench.layer.experts_impl
    result: dict[str, Any] = {
        "rounds": rounds, "warmup": warmup, "reference": reference,
        "what": f"slowest rank per round, {'CUDA events' if bench.on_gpu else 'wall clock'}; experts via "
                f"{impl}; speedup_vs_reference = {reference} / candidate per round",
        "shape": asdict(bench.shape), "experts_impl": impl,
        # SMs a candidate takes from the GEMMs: the larger of its ops' counts (they run one after the other)
        "num_sms": {name: max(int(d.num_sms), int(c.num_sms)) for name, (d, c) in runnable.items()},
        "configs": {name: {"dispatch": d.as_dict(), "combine": c.as_dict()} for name, (d, c) in runnable.items()},
        "schedules": reduce_rounds([times for times, _, _ in gathered], reference),
        "skipped_candidates": skipped,
        # bf16 index_add on GPU is not deterministic: a spread of ~1e-3 is noise, ~1 a wrong result
        "output_spread": per_rank_spread,
    }
    if per_rank_spread > OUTPUT_TOLERANCE or not all(math.isfinite(v) for v in all_norms):
        result["note"] = (f"layer outputs differ between candidates by {per_rank_spread:.3g} (relative norm): "
                          "a config changed the result, treat these timings as suspect")
    return result


def _add_checks(result: dict[str, Any], per_rank: list[dict[str, Any]], lib: LayerLibrary,
                not_run: dict[str, str]) -> dict[str, Any]:
    """The result's fields from every rank's first steps (nothing for a library without them: v1's result keeps
    its layout): the library's calls, schedules it cannot run, compile seconds, the reference check."""
    notes = [result["note"]] if "note" in result else []
    if lib.calls:
        result.update(library=lib.name, calls=dict(lib.calls))
    if not_run:
        result["schedules_not_run"] = dict(not_run)
    firsts = [c["first_call_s"] for c in per_rank if c.get("first_call_s")]
    if firsts:
        result["first_call_s"] = {n: max(f[n] for f in firsts) for n in firsts[0]}
        result["first_call_note"] = ("host seconds of each candidate's first forward + backward, before the rounds: "
                                     "JIT compiles of its new kernels")
    knobs = {n: f"rank {r}: {m}" for r, c in enumerate(per_rank) for n, m in c.get("knobs", {}).items()}
    if knobs:
        result["knobs_not_in_effect"] = knobs
        notes.append(f"{', '.join(sorted(knobs))} did not run the settings asked for: their timings are of others")
    if lib.verify:
        result["reference_check"] = ref = _reference_result(per_rank)
        if ref.get("wrong"):
            notes.append(f"{', '.join(ref['wrong'])} gave a wrong output or gradient against the reference: "
                         "treat their timings as suspect")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _reference_result(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Every candidate's worst error over ranks against ReferenceComm, per output and gradient."""
    why = next((c["reference"] for c in per_rank if c.get("reference")), None)
    if why:
        return {"skipped": why}
    names = per_rank[0]["errors"]
    errors = {n: {k: max(c["errors"][n][k] for c in per_rank) for k in names[n]} for n in names}
    return {"against": "the same layer through the reference buffer (DeepEP v1 semantics over gloo, host copies)",
            "metric": "worst row's error / RMS row norm, max over ranks", "tolerance": VERIFY_TOLERANCE,
            "errors": errors, "wrong": [n for n, e in errors.items() if max(e.values()) > VERIFY_TOLERANCE]}
