"""The communication of one MoE layer step behind one small interface (LayerComm), with one implementation per
library, so that tune/layer.py's model, schedules, checks and timing are written once.

A step of the layer makes four calls, each with the candidate's settings (search's OBJECTIVE_PARTS pairs them the
same way: an op's backward counterpart runs at that op's config):
- dispatch: non-cached, forward; returns the received rows, each row's local experts and routing weights, the
  rows per local expert (padded to GROUP_ALIGN) and the library's handle;
- combine: forward, with a wait the layer calls either at once ("sequential") or after the shared experts
  ("overlap": only where the library can run the combine beside the compute stream, see no_overlap);
- combine_backward: the gradient of dispatch, a combine of the received-row gradients that also reduces the
  routing-weight gradients;
- dispatch_backward: the gradient of combine, a cached dispatch with the forward's handle.
activate() makes a candidate's settings current, untimed, before each step; check() says whether the library ran
what was asked (a handle that carries other settings).

Implementations: V1Comm (deep_ep.Buffer, and the CPU reference buffer), ElasticComm (DeepEP V2's ElasticBuffer),
HybridComm (HybridEPBuffer) and ReferenceComm (the reference buffer on host copies: what a correct library returns,
to check the others against). The backends make them through a LayerLibrary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..deepep.config import ConfigArgs, deepep_default
from ..deepep.workload import LayerShape
from ..knobs import Knobs

# Rows of each expert's group are padded to a multiple of this (DeepEP's expert_alignment does the counting).
# torch._grouped_mm's CUTLASS path (SM90/SM100, bf16) needs 16-byte aligned group starts along a dynamic
# dimension in some layouts (the weight-gradient 2d x 2d case); 8 bf16 rows = 16 bytes. Costs < 8 rows/expert.
GROUP_ALIGN = 8


def pad_counts(counts: list[int], align: int = GROUP_ALIGN) -> list[int]:
    return [-(-int(c) // align) * align for c in counts]


def _no_wait() -> None:
    """The wait of a combine that finished on the compute stream."""


@dataclass
class Received:
    """What a forward dispatch hands the routed experts, in the library's receive order."""

    x: torch.Tensor  # [N, H] received rows
    topk_idx: torch.Tensor  # [N, K'] each row's local expert per slot, -1 where the slot's expert is elsewhere
    topk_weights: torch.Tensor  # [N, K'] float32 routing weight per slot (only read where topk_idx >= 0)
    counts: list[int]  # rows per local expert, padded to GROUP_ALIGN (>= the real counts)
    handle: Any  # what combine and the backward need; opaque to the layer


class LayerComm(Protocol):
    """One candidate's communication for the layer (see the module docstring). Every rank makes the same calls in
    the same order: each call is a collective."""

    no_overlap: str | None
    """Why the forward combine cannot run beside the shared experts, or None (then "overlap" is a real schedule)."""

    def activate(self) -> None: ...

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> Received: ...

    def combine(self, y: torch.Tensor, handle: Any) -> tuple[torch.Tensor, Callable[[], None]]: ...

    def combine_backward(self, grad: torch.Tensor, grad_w: torch.Tensor | None, handle: Any
                         ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def dispatch_backward(self, grad: torch.Tensor, handle: Any) -> torch.Tensor: ...

    def check(self) -> str | None: ...


@dataclass
class LayerLibrary:
    """What tune/layer.check_layer needs from a library: a LayerComm per candidate (dispatch, combine) and the
    rules that say which candidates can run."""

    name: str
    comm_of: Callable[[Knobs, Knobs], LayerComm]
    candidate_error: Callable[[LayerShape, Knobs, Knobs], str | None]
    idx_dtype: torch.dtype  # the library's top-k index dtype (deep_ep.topk_idx_t)
    group: Any = None  # group of the result's all_gather_object (None: the tuner's default gloo group)
    # Kernels JIT-compile at their first call (V2, HybridEP): each candidate's first step runs untimed on the
    # host clock (reported apart) and at least two warm-up rounds follow, so no timed round pays a compile.
    jit: bool = False
    # Check each candidate's output and gradients against ReferenceComm (the library's calls are new code here).
    verify: bool = False
    calls: dict[str, str] = field(default_factory=dict)  # what each call of a step is, for the result


# --- DeepEP v1 (deep_ep.Buffer; also the reference buffer) -----------------------------------------------------
class V1Comm:
    """deep_ep.Buffer as torchtitan's v1-era integration called it (torchtitan/distributed/deepep/deepep.py before
    756213e): get_dispatch_layout, then every call with previous_event=capture(), async_finish=True,
    allocate_on_comm_stream=True and a wait; the forward combine's wait is the caller's (torchtitan's
    sync_combine). Each call passes the candidate's Config."""

    no_overlap: str | None = None
    CALLS: ClassVar[dict[str, str]] = {"dispatch": "get_dispatch_layout + dispatch(config=dispatch), waited",
             "combine": "combine(config=combine), async, waited by the schedule",
             "combine_backward": "combine(grad, topk_weights=grad_w, config=combine), waited",
             "dispatch_backward": "dispatch(grad, handle=, config=dispatch), waited"}

    def __init__(self, buffer: Any, dispatch_config: Any, combine_config: Any) -> None:
        self.buffer, self.dispatch_config, self.combine_config = buffer, dispatch_config, combine_config

    def _wait(self, fn: Callable[..., tuple], **kwargs: Any) -> tuple:
        """torchtitan's pattern: order after the compute stream, run on DeepEP's stream, then wait for it."""
        out = fn(previous_event=self.buffer.capture(), async_finish=True, allocate_on_comm_stream=True, **kwargs)
        out[-1].current_stream_wait()
        return out

    def activate(self) -> None:
        pass  # a Config is passed per call: nothing to set

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> Received:
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = self._wait(
            self.buffer.dispatch, x=x, topk_idx=topk_idx, topk_weights=topk_weights.float(),
            num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, expert_alignment=GROUP_ALIGN, config=self.dispatch_config)
        return Received(recv_x, recv_idx, recv_w, list(counts), handle)

    def combine(self, y: torch.Tensor, handle: Any) -> tuple[torch.Tensor, Callable[[], None]]:
        combined, _, event = self.buffer.combine(x=y, handle=handle, config=self.combine_config,
                                                 previous_event=self.buffer.capture(), async_finish=True,
                                                 allocate_on_comm_stream=True)
        return combined, event.current_stream_wait

    def combine_backward(self, grad: torch.Tensor, grad_w: torch.Tensor | None, handle: Any
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_x, grad_topk_w, _ = self._wait(self.buffer.combine, x=grad, handle=handle, topk_weights=grad_w,
                                            config=self.combine_config)
        return grad_x, grad_topk_w

    def dispatch_backward(self, grad: torch.Tensor, handle: Any) -> torch.Tensor:
        return self._wait(self.buffer.dispatch, x=grad, handle=handle, config=self.dispatch_config)[0]

    def check(self) -> str | None:
        return None  # a v1 handle's settings are not readable from Python


class ReferenceComm(V1Comm):
    """What a correct library returns: DeepEP v1's semantics (deepep.refbuffer.ReferenceBuffer) over `group` (gloo)
    on host copies. Slow: run once, untimed, to check every candidate's output and gradients against it."""

    def __init__(self, group: Any, num_ranks: int, device: torch.device) -> None:
        from ..deepep.refbuffer import ReferenceBuffer, ReferenceConfig

        def config(op: str) -> Any:
            return ReferenceConfig(*ConfigArgs.of(deepep_default(op, num_ranks)).as_tuple())

        # The reference buffer allocates nothing: its size checks only compare numbers, so any large size does.
        super().__init__(ReferenceBuffer(group, 1 << 50), config("dispatch"), config("combine"))
        self.device = device

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> Received:
        r = super().dispatch(x.cpu(), topk_idx.cpu().long(), topk_weights.cpu(), num_experts)
        return Received(r.x.to(self.device), r.topk_idx.to(self.device), r.topk_weights.to(self.device), r.counts,
                        r.handle)

    def combine(self, y: torch.Tensor, handle: Any) -> tuple[torch.Tensor, Callable[[], None]]:
        combined, wait = super().combine(y.cpu(), handle)
        return combined.to(self.device), wait

    def combine_backward(self, grad: torch.Tensor, grad_w: torch.Tensor | None, handle: Any
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gx, gw = super().combine_backward(grad.cpu(), None if grad_w is None else grad_w.cpu(), handle)
        return gx.to(self.device), None if gw is None else gw.to(self.device)

    def dispatch_backward(self, grad: torch.Tensor, handle: Any) -> torch.Tensor:
        return super().dispatch_backward(grad.cpu(), handle).to(self.device)


# --- DeepEP V2 (deep_ep.ElasticBuffer) ----------------------------------------------------------------------------
class ElasticComm:
    """DeepEP V2's ElasticBuffer as torchtitan main calls it (torchtitan/distributed/deepep/deepep.py @b5bcd76):
    a non-cached dispatch with an explicit num_sms (compact layout, host sync); the forward combine with
    async_with_compute_stream=True, waited later (sync_combine); the dispatch's backward a combine of the
    gradients with the routing-weight gradients as topk_weights; the combine's backward a cached dispatch with
    do_cpu_sync=False. SM counts: the dispatch and the cached dispatch run the candidate's dispatch count
    (torchtitan passes handle.num_sms, the dispatch's), both combines the candidate's combine count (what
    deepep_tune.runtime.elastic.apply makes torchtitan's num_sms=0 combines run). expert_alignment is the one the
    search used, so the searched kernels are reused (a different value is another JIT compile); rows per expert
    are padded to GROUP_ALIGN here."""

    no_overlap: str | None = None
    CALLS: ClassVar[dict[str, str]] = {"dispatch": "dispatch(x, topk_idx, topk_weights, num_sms=dispatch)",
             "combine": "combine(y, handle, num_sms=combine, async_with_compute_stream=True), waited by the schedule",
             "combine_backward": "combine(grad, handle, topk_weights=grad_w, num_sms=combine)",
             "dispatch_backward": "dispatch(grad, handle=, num_sms=dispatch, do_cpu_sync=False)"}

    def __init__(self, buffer: Any, dispatch_sms: int, combine_sms: int, expert_alignment: int) -> None:
        self.buffer, self.dispatch_sms, self.combine_sms = buffer, dispatch_sms, combine_sms
        self.expert_alignment = expert_alignment
        self.handle_sms: int | None = None

    def activate(self) -> None:
        pass  # num_sms is passed per call: nothing to set

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> Received:
        recv_x, recv_idx, recv_w, handle, _ = self.buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights.float(), num_experts=num_experts,
            expert_alignment=self.expert_alignment, num_sms=self.dispatch_sms)
        self.handle_sms = int(handle.num_sms)
        return Received(recv_x, recv_idx, recv_w, pad_counts(handle.num_recv_tokens_per_expert_list), handle)

    def combine(self, y: torch.Tensor, handle: Any) -> tuple[torch.Tensor, Callable[[], None]]:
        combined, _, event = self.buffer.combine(y, handle, num_sms=self.combine_sms, async_with_compute_stream=True)
        return combined, event.current_stream_wait

    def combine_backward(self, grad: torch.Tensor, grad_w: torch.Tensor | None, handle: Any
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_x, grad_topk_w, _ = self.buffer.combine(grad, handle, topk_weights=grad_w, num_sms=self.combine_sms)
        return grad_x, grad_topk_w

    def dispatch_backward(self, grad: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.buffer.dispatch(grad, handle=handle, num_sms=self.dispatch_sms, do_cpu_sync=False)[0]

    def check(self) -> str | None:
        if self.handle_sms is not None and self.handle_sms != self.dispatch_sms:
            return f"V2's handle says the dispatch ran {self.handle_sms} SMs, not the requested {self.dispatch_sms}"
        return None


# --- HybridEP (deep_ep.HybridEPBuffer) ----------------------------------------------------------------------------
@dataclass
class HybridHandle:
    """HybridEP's 7-tuple handle, with what the layer derived from the forward dispatch."""

    handle: tuple
    num_recv: int  # rows dispatched to this rank (handle[3])
    slot: torch.Tensor  # [N, K'] column of this rank's experts each received slot stands for
    hit: torch.Tensor  # [N, K'] whether that slot is one of the row's experts
    lo: int  # first column of this rank's experts in the dispatch's probs
    width: int  # columns of the dispatch's probs
    topk_idx: torch.Tensor  # this rank's [T, K] routing: the combined probs gradient is read back with it
    num_experts: int


class HybridComm:
    """HybridEP's plain dispatch/combine and the layer's own permutation (HybridEP's documented "dispatch ->
    local_permute -> expert_mlp -> local_unpermute -> combine"; Megatron and torchtitan call the permute variants
    dispatch_with_permute / combine_with_unpermute, whose permute kernels this layer replaces by its PyTorch
    permutation, as for the other libraries). The forward dispatch carries the routing weights as probs; each
    received row's local experts come from the handle's local_expert_routing_map; the dispatch's backward is a
    combine that also reduces the probs gradient; the combine's backward a cached dispatch with the handle.
    A handle carries both ops' settings from the non-cached dispatch that made it: activate() sets the candidate's
    (SM counts into configurer.buffer_config, chunk/stage environment variables) before each step."""

    no_overlap: str | None = ("HybridEPBuffer.combine runs on the current stream and returns no event to wait on "
                                 "later: the shared experts cannot run beside it")
    CALLS: ClassVar[dict[str, str]] = {"dispatch": "dispatch(hidden, topk_idx, topk_weights, num_of_experts) (non-cached: preprocessing, host sync)",
             "combine": "combine(hidden, handle=) on the compute stream",
             "combine_backward": "combine(grad, probs=grad of the probs, handle=)",
             "dispatch_backward": "dispatch(grad, handle=, num_dispatched_tokens=)"}

    def __init__(self, buffer: Any, apply_settings: Callable[[], None], mismatch: Callable[[Any], str | None],
                 rank: int, num_tokens: int, hidden: int) -> None:
        self.buffer, self.apply_settings, self.mismatch = buffer, apply_settings, mismatch
        self.rank, self.num_tokens, self.hidden = rank, num_tokens, hidden
        self.problem: str | None = None

    def activate(self) -> None:
        self.apply_settings()
        # The non-cached dispatch calls update_template_config itself, and a chunk change re-allocates the buffer
        # there (collective, slow). A training run with one config pays that once; calling it here, untimed, leaves
        # the timed dispatch nothing to re-allocate when the candidates before it had other chunks.
        self.buffer.update_template_config(hidden_dim=self.hidden, num_of_tokens_per_rank=self.num_tokens)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> Received:
        recv_x, recv_probs, _, handle = self.buffer.dispatch(hidden=x, topk_idx=topk_idx,
                                                             topk_weights=topk_weights.float(),
                                                             num_of_experts=num_experts)
        n = int(handle[3].reshape(-1)[0])
        self.problem = self.problem or self.mismatch(handle[6])
        local = handle[4][:n].bool()  # [n, local experts]: which of this rank's experts each received row goes to
        num_local = local.shape[1]
        width = recv_probs.shape[1]  # this rank's experts, or all experts of the NVLink domain
        lo = self.rank * num_local if width > num_local else 0
        # Up to K slots per row, its local experts first (argsort of "not mine" is stable): the top-k layout the
        # layer's permutation takes, as v1 and V2 return it.
        k = min(topk_idx.shape[1], num_local)
        slot = torch.argsort((~local).to(torch.uint8), dim=1, stable=True)[:, :k]
        hit = local.gather(1, slot)
        probs = recv_probs[:n, lo:lo + num_local].float().gather(1, slot)
        idx = torch.where(hit, slot, torch.full_like(slot, -1))
        w = torch.where(hit, probs, torch.zeros_like(probs))
        state = HybridHandle(handle, n, slot, hit, lo, width, topk_idx, num_experts)
        return Received(recv_x[:n], idx, w, pad_counts(local.sum(0).tolist()), state)

    def combine(self, y: torch.Tensor, h: HybridHandle) -> tuple[torch.Tensor, Callable[[], None]]:
        combined, _ = self.buffer.combine(hidden=y, handle=h.handle)
        return combined, _no_wait

    def combine_backward(self, grad: torch.Tensor, grad_w: torch.Tensor | None, h: HybridHandle
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        probs = None
        if grad_w is not None:  # back into the dispatch's probs layout: one column per expert
            probs = torch.zeros(h.num_recv, h.width, dtype=torch.float32, device=grad.device)
            probs[:, h.lo:].scatter_(1, h.slot, grad_w.float().masked_fill(~h.hit, 0))  # a row's slots are distinct
        grad_x, grad_probs = self.buffer.combine(hidden=grad, probs=probs, handle=h.handle)
        # Combined probs are [T, experts of the node] (one node: all experts), read back at this rank's top-k.
        grad_topk_w = None if grad_probs is None else grad_probs.gather(1, h.topk_idx.long())
        return grad_x, grad_topk_w

    def dispatch_backward(self, grad: torch.Tensor, h: HybridHandle) -> torch.Tensor:
        # num_dispatched_tokens skips HybridEP's host sync (the count is known from the forward's handle)
        out = self.buffer.dispatch(hidden=grad, num_of_experts=h.num_experts, handle=h.handle,
                                   num_dispatched_tokens=h.num_recv)
        return out[0][:h.num_recv]

    def check(self) -> str | None:
        return self.problem
