"""Audit two real framework patterns against a results file, without and with deepep_tune.apply.

    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_audit.py RESULTS_EP2.json

Scenarios, each with its own deep_ep.Buffer (explicitly_destroy=True, destroyed after):
  torchtitan     torchtitan's fused_a2a autograd pair (buffer sized from Buffer.get_*_config hints,
                 dispatch/combine without config=), forward + backward on real tokens
  fork           the NousResearch torchtitan fork's DeepEPTokenDispatcher: set_num_sms(turbo_deepep_num_cus)
                 and Config(num_cus, *turbo_deepep_*_tuned_config) built but never passed
Each runs without apply, then with apply (apply before the Buffer exists, unapply after). Rank 0 prints
"<scenario>: <verdict line>" per run and a summary; the exit code is 1 if a verdict is not the expected one.

Without CUDA (or with --fake) it runs on CPU against tests/fake_deep_ep over gloo, as a smoke check.
The tests (tests/test_apply_audit.py) import the framework transcriptions below.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_DEEP_EP = os.path.join(ROOT, "tests", "fake_deep_ep")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from deepep_tune.deepep.config import DEEPEP_DEFAULT_NUM_SMS as DEEPEP_NUM_SMS  # noqa: E402
from deepep_tune.deepep.config import DEEPEP_DEFAULTS
from deepep_tune.record.results import load_results  # noqa: E402
from deepep_tune.runtime.apply import acquire_recorder, apply, release_recorder, unapply  # noqa: E402
from deepep_tune.runtime.audit import IN_EFFECT, NOT_IN_EFFECT, Verdict, audit  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Framework code, transcribed. The names below stand for `from deep_ep import Buffer, Config` and
# `from deep_ep.utils import EventOverlap, EventHandle` at the top of those files; bind_deep_ep() fills them,
# so the same code runs on real DeepEP and on tests/fake_deep_ep.

Buffer: Any = None
Config: Any = None
EventOverlap: Any = None
EventHandle: Any = None


def bind_deep_ep(deep_ep: Any) -> None:
    global Buffer, Config, EventOverlap, EventHandle
    Buffer, Config = deep_ep.Buffer, deep_ep.Config
    EventOverlap, EventHandle = deep_ep.utils.EventOverlap, deep_ep.utils.EventHandle


# --- torchtitan/distributed/deepep/fused_a2a.py (pytorch/torchtitan 0c9c4c0, NousResearch PR ref; the upstream
# v1-era file has the same get_buffer and Fused* pair). Changes: Buffer(..., explicitly_destroy=True) plus
# destroy_buffer(), so each scenario can release its Buffer.

_buffer = None


def get_hidden_bytes(x: torch.Tensor) -> int:
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group: Any, hidden_bytes: int) -> Any:
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, explicitly_destroy=True)
    return _buffer


def destroy_buffer() -> None:
    global _buffer
    if _buffer is not None:
        _buffer.destroy()
        _buffer = None


class FusedDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False, use_cuda_num_token_per_expert: bool = False, num_worst_tokens: int = 0):
        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = get_buffer(group, get_hidden_bytes(x))
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event) = \
            buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                       async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        (recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event_overlap) = \
            buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
                            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                            num_tokens_per_expert=num_tokens_per_expert, previous_event=event,
                            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream,
                            num_worst_tokens=num_worst_tokens)
        if async_finish:
            after_event_overlap.current_stream_wait()
        ctx.group = group
        ctx.handle = handle
        ctx.async_finish = async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        if not use_cuda_num_token_per_expert:
            tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        else:
            tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list, device=x.device)
        return (recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
        handle = ctx.handle
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        grad_x, grad_token_probs, after_event = buffer.combine(
            grad_output.contiguous(), handle, topk_weights=grad_token_probs.float(), previous_event=previous_event,
            async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None, None, None


class FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = get_buffer(group, get_hidden_bytes(x))
        combined_x, _, after_event = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                    previous_event=previous_event,
                                                    allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            after_event.current_stream_wait()
        ctx.handle = handle
        ctx.group = group
        ctx.async_finish = async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
        grad_x, _, _, _, _, after_event = buffer.dispatch(grad_output.contiguous(), handle=ctx.handle,
                                                          previous_event=previous_event, async_finish=ctx.async_finish,
                                                          allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, None, None, None


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False, use_cuda_num_token_per_expert: bool = False, num_worst_tokens: int = 0):
    return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group, async_finish,
                               allocate_on_comm_stream, use_cuda_num_token_per_expert, num_worst_tokens)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms):
    Buffer.set_num_sms(num_sms)


# --- torchtitan/distributed/deepep/utils.py of the NousResearch fork (9a5f6cfd, seen in pytorch/torchtitan PR
# refs 2237..2627): the parts that touch DeepEP. Kept: set_deepep_num_sms(turbo_deepep_num_cus) in the
# dispatcher, Config(deep_num_cus, *tuned) in the manager (built, never passed), and the manager's
# dispatch/combine calls with async_finish/allocate_on_comm_stream=True. Left out: expert permutation, the
# D2H stream, and sync_comm_stream (this fused_a2a version has no such argument).

class PrimusTurboDeepepManager:
    def __init__(self, router_topk: int, num_experts: Optional[int] = None, deep_num_cus: int = 32,
                 dispatch_tuned_config: Optional[tuple] = None, combine_tuned_config: Optional[tuple] = None):
        self.router_topk = router_topk
        self.num_experts = num_experts
        self.deep_num_cus = deep_num_cus
        self.handle = None

        def _get_deepep_config(config: tuple) -> Any:
            return Config(deep_num_cus, *config)

        self.dispatch_config = _get_deepep_config(dispatch_tuned_config) if dispatch_tuned_config is not None else None
        self.combine_config = _get_deepep_config(combine_tuned_config) if combine_tuned_config is not None else None

    def setup_metadata(self, top_scores: torch.Tensor, selected_indices: torch.Tensor) -> None:
        self.token_probs = top_scores.view(-1, self.router_topk)
        self.token_indices = selected_indices.view(-1, self.router_topk)

    def dispatch(self, hidden_states: torch.Tensor, group: Any, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> torch.Tensor:
        if self.token_probs.dtype != torch.float32:
            self.token_probs = self.token_probs.float()
        hidden_states, dispatched_indices, dispatched_probs, num_tokens_per_expert, handle = fused_dispatch(
            hidden_states, self.token_indices, self.token_probs, self.num_experts, group, async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream, use_cuda_num_token_per_expert=False, num_worst_tokens=0)
        self.handle = handle
        self.dispatched_probs = dispatched_probs
        return hidden_states

    def combine(self, hidden_states: torch.Tensor, group: Any, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> torch.Tensor:
        hidden_states, event = fused_combine(hidden_states, group, self.handle, async_finish=async_finish,
                                             allocate_on_comm_stream=allocate_on_comm_stream)
        self.handle = None
        return hidden_states


class DeepEPTokenDispatcher:
    turbo_deepep_num_cus: int = 128
    turbo_deepep_dispatch_tuned_config: Optional[tuple] = (18, 512, 8, 128)
    turbo_deepep_combine_tuned_config: Optional[tuple] = (16, 256, 8, 128)

    def __init__(self, moe_router_topk: int, num_moe_experts: int):
        set_deepep_num_sms(self.turbo_deepep_num_cus)
        self._comm_manager = PrimusTurboDeepepManager(
            router_topk=moe_router_topk, num_experts=num_moe_experts, deep_num_cus=self.turbo_deepep_num_cus,
            dispatch_tuned_config=self.turbo_deepep_dispatch_tuned_config,
            combine_tuned_config=self.turbo_deepep_combine_tuned_config)

    def dispatch_preprocess(self, top_scores: torch.Tensor, selected_indices: torch.Tensor) -> None:
        self._comm_manager.setup_metadata(top_scores, selected_indices)

    def token_dispatch(self, hidden_states: torch.Tensor, probs: Optional[torch.Tensor] = None, group: Any = None,
                       async_finish: bool = True, allocate_on_comm_stream: bool = True):
        return (self._comm_manager.dispatch(hidden_states, group, async_finish, allocate_on_comm_stream),
                self._comm_manager.dispatched_probs)

    def token_combine(self, hidden_states: torch.Tensor, group: Any = None, async_finish: bool = True,
                      allocate_on_comm_stream: bool = True) -> torch.Tensor:
        return self._comm_manager.combine(hidden_states, group, async_finish, allocate_on_comm_stream)


# ----------------------------------------------------------------------------------------------------------
# One training step of each pattern: forward and backward through dispatch and combine. The backward of a
# dispatch is a combine; the backward of a combine is a cached dispatch with the forward's handle.

def torchtitan_step(group: Any, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                    num_experts: int) -> None:
    x = x.detach().clone().requires_grad_(True)
    recv_x, _, recv_probs, _, handle = fused_dispatch(x, topk_idx, topk_weights, num_experts, group)
    expert_out = recv_x * 2  # stands in for the experts
    combined, _ = fused_combine(expert_out, group, handle)
    _loss(combined, recv_probs).backward()


def _loss(combined: torch.Tensor, recv_probs: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. the probs is a dense tensor: DeepEP's combine asserts contiguous top-k
    weights, and the expanded gradient of a bare .sum() trips it (seen on the GPU: deep_ep.cpp:825)."""
    weights = torch.linspace(0.5, 1.5, recv_probs.numel(), device=recv_probs.device).view_as(recv_probs)
    return combined.float().sum() + (recv_probs * weights).sum()


def fork_step(group: Any, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
              num_cus: int, dispatch_tuple: tuple, combine_tuple: tuple) -> None:
    """The user pasted the tuned values into the fork's class attributes, as its docs say."""
    DeepEPTokenDispatcher.turbo_deepep_num_cus = num_cus
    DeepEPTokenDispatcher.turbo_deepep_dispatch_tuned_config = dispatch_tuple
    DeepEPTokenDispatcher.turbo_deepep_combine_tuned_config = combine_tuple
    dispatcher = DeepEPTokenDispatcher(moe_router_topk=topk_idx.size(1), num_moe_experts=num_experts)
    x = x.detach().clone().requires_grad_(True)
    dispatcher.dispatch_preprocess(topk_weights, topk_idx)
    recv_x, recv_probs = dispatcher.token_dispatch(x, group=group)
    combined = dispatcher.token_combine(recv_x * 2, group=group)
    _loss(combined, recv_probs).backward()


def fork_tuples(results: Any) -> tuple[int, tuple, tuple]:
    """turbo_deepep_num_cus and the two 4-tuples the fork wants, from a results file."""
    t = load_results(results)
    return (t.num_sms, (t.dispatch.nvl_chunk, t.dispatch.nvl_buffer, t.dispatch.rdma_chunk, t.dispatch.rdma_buffer),
            (t.combine.nvl_chunk, t.combine.nvl_buffer, t.combine.rdma_chunk, t.combine.rdma_buffer))


def run_scenario(step: Callable[[], None], results: Any, with_apply: bool, deep_ep: Any,
                 shapes: Optional[dict] = None) -> Verdict:
    """Audit one step; apply first if asked. Leaves deep_ep as it found it (Buffer.num_sms included)."""
    num_sms_before = deep_ep.Buffer.num_sms
    try:
        if with_apply:
            apply(results, **(shapes or {}))
        with audit(results, quiet=True) as a:
            try:
                step()
            finally:
                destroy_buffer()
        return a.verdict()
    finally:
        unapply()
        deep_ep.Buffer.num_sms = num_sms_before


def expected_status(results: Any, scenario: str, with_apply: bool) -> str:
    if with_apply:
        return IN_EFFECT
    t = load_results(results)
    defaults_run = all(DEEPEP_DEFAULTS[op].get(t.ep_size) == (args.nvl_chunk, args.nvl_buffer)
                       for op, args in (("dispatch", t.dispatch), ("combine", t.combine)))
    # The fork calls set_num_sms with the tuned value; torchtitan leaves DeepEP's 20.
    sms_ok = scenario == "fork" or t.num_sms == DEEPEP_NUM_SMS
    return IN_EFFECT if defaults_run and sms_ok else NOT_IN_EFFECT


# ----------------------------------------------------------------------------------------------------------

def _import_deep_ep(fake: bool) -> Any:
    if fake:
        sys.path.insert(0, FAKE_DEEP_EP)
    import deep_ep
    return deep_ep


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results JSON written by deepep-tune (its ep_size must equal the world size)")
    parser.add_argument("--num-tokens", type=int, default=512, help="tokens per rank (default 512)")
    parser.add_argument("--fake", action="store_true", help="use tests/fake_deep_ep on CPU (default without CUDA)")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available() and not args.fake
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    tuned = load_results(args.results)
    if tuned.ep_size != world:
        say(f"gpu_audit: {args.results} is for ep_size {tuned.ep_size}; run with --nproc_per_node {tuned.ep_size}")
        dist.destroy_process_group()
        return 2
    deep_ep = _import_deep_ep(not use_cuda)
    bind_deep_ep(deep_ep)
    group = dist.new_group(list(range(world)))

    hidden = int(tuned.workload.get("hidden", 7168))
    num_topk = int(tuned.workload.get("num_topk", 8))
    num_experts = int(tuned.workload.get("num_experts", 256))
    torch.manual_seed(rank)
    x = torch.randn(args.num_tokens, hidden, dtype=torch.bfloat16, device=device)
    scores = torch.randn(args.num_tokens, num_experts, device=device).abs() + 1
    top = torch.topk(scores, num_topk, dim=-1)
    topk_idx = top.indices.to(getattr(deep_ep, "topk_idx_t", torch.int64)).contiguous()
    topk_weights = torch.softmax(top.values, dim=-1).float().contiguous()
    num_cus, d_tuple, c_tuple = fork_tuples(args.results)

    steps = {
        "torchtitan": lambda: torchtitan_step(group, x, topk_idx, topk_weights, num_experts),
        "fork": lambda: fork_step(group, x, topk_idx, topk_weights, num_experts, num_cus, d_tuple, c_tuple),
    }
    shapes = {"hidden": hidden, "num_topk": num_topk, "num_experts": num_experts}
    say(f"gpu_audit: {world} ranks on {torch.cuda.get_device_name() if use_cuda else 'CPU (fake deep_ep)'}, "
        f"deep_ep from {os.path.dirname(deep_ep.__file__)}, {args.num_tokens} tokens x hidden {hidden}, "
        f"top-{num_topk} of {num_experts}; tuned ep{tuned.ep_size} num_sms {tuned.num_sms}, dispatch {tuned.dispatch}, "
        f"combine {tuned.combine}")
    ok = 0
    for name, step in steps.items():
        for with_apply in (False, True):
            label = f"{name}{' + apply' if with_apply else ''}"
            v = run_scenario(step, args.results, with_apply, deep_ep, shapes)
            if use_cuda:
                torch.cuda.synchronize()
            dist.barrier()
            want = expected_status(args.results, name, with_apply)
            ok += v.status == want
            note = "" if v.status == want else f"   <-- UNEXPECTED (expected {want})"
            say(f"{label}: {v.line}{note}")
    say(f"gpu_audit: {ok}/{2 * len(steps)} verdicts as expected; Config recorder: "
        f"{_recorder_mode_probe(deep_ep)}")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok == 2 * len(steps) else 1


def _recorder_mode_probe(deep_ep: Any) -> str:
    """Which recording mode this DeepEP allows ("subclass" is expected for pybind11)."""
    try:
        return acquire_recorder(deep_ep)
    finally:
        release_recorder()


if __name__ == "__main__":
    sys.exit(main())
