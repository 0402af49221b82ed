"""vLLM DeepEP V2 backend (--all2all-backend deepep_v2): DeepEPV2All2AllManager + DeepEPV2PrepareAndFinalize.

Transcribed from stored index copies (commit dates not available from the index):
- vllm-project/vllm@001430048e8175c8dff1bc57e1a81a1fa75460f9 vllm/distributed/device_communicators/all2all.py,
  class DeepEPV2All2AllManager: _make_all2all_kwargs (prefer_overlap_with_compute=envs.VLLM_DEEPEP_V2_PREFER_OVERLAP,
  default "0" -> False; allow_hybrid_mode / allow_multiple_reduction from env, default False; timeouts
  VLLM_DEEPEP_TIMEOUT_SECS=1800; explicitly_destroy=True), get_handle (`import deep_ep` at call time,
  handle_cache.get_or_create(buffer_kwargs, deep_ep.ElasticBuffer); self._num_sms = get_theoretical_num_sms(...)
  once, only for max_sms_used() / DBO SM budgeting). The GIN probe is dropped.
- vllm-project/vllm@02bd2a494f5c722c044ded73cb16e766e8007f0d
  vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_v2.py: module-level `import deep_ep`;
  DeepEPV2PrepareAndFinalize._do_dispatch: buffer.dispatch(...) WITHOUT num_sms / num_qps (-> 0 -> ElasticBuffer
  computes get_theoretical_num_sms(num_experts, num_topk) inside dispatch, elastic.py L928); _finalize:
  buffer.combine(...) WITHOUT num_sms (-> handle.num_sms, elastic.py L1086).
- envs.py: VLLM_DEEPEP_V2_ALLOW_HYBRID_MODE / VLLM_DEEPEP_V2_PREFER_OVERLAP / VLLM_DEEPEP_V2_ALLOW_MULTIPLE_REDUCTION,
  all int(os.getenv(..., "0")).
Quantisation, DBO micro-batch slots, layout conversion and the Triton kernel are dropped."""

from __future__ import annotations

import os

import deep_ep          # prepare_finalize/deepep_v2.py imports the module (attribute lookups happen per call)


def _env_flag(name: str) -> bool:
    return bool(int(os.getenv(name, "0")))


class DeepEPV2All2AllManager:
    def __init__(self, cpu_group, device_group=None):
        self.cpu_group, self._device_group = cpu_group, device_group
        self._cache = {}
        self._num_sms = None

    def _make_all2all_kwargs(self, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
                             use_fp8_dispatch: bool) -> dict:
        timeout_secs = int(os.getenv("VLLM_DEEPEP_TIMEOUT_SECS", "1800"))
        return dict(group=self._device_group if self._device_group is not None else self.cpu_group,
                    num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden, num_topk=num_topk,
                    use_fp8_dispatch=use_fp8_dispatch,
                    allow_hybrid_mode=_env_flag("VLLM_DEEPEP_V2_ALLOW_HYBRID_MODE"),
                    prefer_overlap_with_compute=_env_flag("VLLM_DEEPEP_V2_PREFER_OVERLAP"),
                    allow_multiple_reduction=_env_flag("VLLM_DEEPEP_V2_ALLOW_MULTIPLE_REDUCTION"),
                    num_cpu_timeout_secs=timeout_secs, num_gpu_timeout_secs=timeout_secs,
                    explicitly_destroy=True)

    def get_handle(self, kwargs):
        import deep_ep                                             # at call time
        num_experts = kwargs.pop("num_experts", 256)
        buffer_kwargs = self._make_all2all_kwargs(**kwargs)
        key = tuple(sorted((k, id(v) if k == "group" else v) for k, v in buffer_kwargs.items()))
        if key not in self._cache:                                 # Cache.get_or_create(kwargs, factory)
            self._cache[key] = deep_ep.ElasticBuffer(**buffer_kwargs)
        handle = self._cache[key]
        if self._num_sms is None:
            self._num_sms = handle.get_theoretical_num_sms(num_experts=num_experts, num_topk=kwargs["num_topk"])
        return handle

    def max_sms_used(self):
        return self._num_sms


class DeepEPV2PrepareAndFinalize:
    def __init__(self, buffer, num_experts: int, num_topk: int, use_cudagraph: bool = False):
        self.buffer, self.num_experts, self.num_topk, self.use_cudagraph = buffer, num_experts, num_topk, use_cudagraph
        self.handles = [None, None]

    def prepare(self, a1, topk_weights, topk_ids, num_experts: int):
        do_expand = not self.use_cudagraph
        do_cpu_sync = not self.use_cudagraph
        num_max_tokens_per_rank = None
        if not do_expand:
            n = a1.shape[0]
            num_max_tokens_per_rank = 1 << max(n - 1, 0).bit_length()
        recv_x, recv_topk_idx, recv_topk_weights, handle, event = self.buffer.dispatch(
            x=a1, topk_idx=topk_ids, topk_weights=topk_weights, num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank, do_expand=do_expand, do_cpu_sync=do_cpu_sync,
            async_with_compute_stream=False)
        self.handles[0] = handle
        return recv_x, recv_topk_idx, recv_topk_weights

    def finalize(self, output, fused_expert_output, do_async: bool = False):
        handle = self.handles[0]
        combined_x, _, event = self.buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                                   async_with_compute_stream=do_async,
                                                   allocate_on_comm_stream=do_async)
        output.copy_(combined_x)


def build(manager: DeepEPV2All2AllManager, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
          num_experts: int, use_cudagraph: bool = False) -> DeepEPV2PrepareAndFinalize:
    """fused_moe/all2all_utils.py maybe_make_prepare_finalize, moe.use_deepep_v2_kernels branch (model init)."""
    handle = manager.get_handle(dict(num_max_tokens_per_rank=num_max_tokens_per_rank, hidden=hidden,
                                     num_topk=num_topk, num_experts=num_experts, use_fp8_dispatch=False))
    return DeepEPV2PrepareAndFinalize(handle, num_experts, num_topk, use_cudagraph=use_cudagraph)


def forward_step(pf: DeepEPV2PrepareAndFinalize, x, topk_ids, topk_weights) -> None:
    recv_x, _, _ = pf.prepare(x, topk_weights, topk_ids, pf.num_experts)
    out = x.new_empty(x.shape)
    pf.finalize(out, recv_x)
