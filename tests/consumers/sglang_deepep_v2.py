"""SGLang deepep_v2 backend (--moe-a2a-backend deepep_v2): DeepEP V2 ElasticBuffer.

Transcribed from sgl-project/sglang@0134da0b075f75274c6af785a9bdf543239ba37c (stored index copy; commit date not
available from the index) python/sglang/srt/layers/moe/token_dispatcher/deepep_v2.py: the module-level
`from deep_ep import ElasticBuffer` try-import, DeepEPv2Buffer.get_buffer (class-level singleton keyed on
group/hidden/topk/cap/fp8/hybrid; os.environ.setdefault("EP_REUSE_NCCL_COMM", "0"); ElasticBuffer(...,
allow_hybrid_mode=<--deepep-v2-mode == hybrid>, sl_idx=0, prefer_overlap_with_compute=False)),
_DeepEPv2Impl._resolve_num_sms_qps (env read on EVERY dispatch and EVERY combine; 0 -> buffer.get_theoretical_num_sms),
_DeepEPv2Impl.dispatch (num_sms= and num_qps= passed explicitly) and .combine (num_sms= and num_qps= passed
explicitly: combine does NOT reuse handle.num_sms, it re-resolves). The earlier stored version
@56bb770f94cfecb29779115189c5fe0b113aa752 (DeepEPV2Impl.dispatch_a/combine_a) resolves num_sms the same way.
envs.SGLANG_DEEPEP_V2_NUM_SMS = EnvInt(0) (python/sglang/srt/environ.py); EnvField.get() does os.getenv(name) at
every call, so the value is read per call, not at import. FP8 quantisation, expand/masked layout and empty-batch
padding are dropped."""

from __future__ import annotations

import os

try:
    from deep_ep import ElasticBuffer            # bound at import
    use_deepep_v2 = True
except (ImportError, OSError):
    use_deepep_v2 = False


def _env_int(name: str, default: int) -> int:    # EnvInt(default).get(): os.getenv at every call
    value = os.getenv(name)
    return default if value is None else int(value)


class DeepEPv2Buffer:
    _buffer = None
    _buffer_key = None

    @classmethod
    def get_buffer(cls, group, hidden_size: int, router_topk: int, num_max_dispatch_tokens_per_rank: int,
                   use_fp8_dispatch: bool, allow_hybrid_mode: bool = False):
        key = (id(group), hidden_size, router_topk, num_max_dispatch_tokens_per_rank, use_fp8_dispatch,
               allow_hybrid_mode, group.size())
        if cls._buffer is not None and cls._buffer_key == key:
            return cls._buffer
        if cls._buffer is not None:
            cls.destroy()
        os.environ.setdefault("EP_REUSE_NCCL_COMM", "0")
        cls._buffer = ElasticBuffer(group, num_max_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                                    hidden=hidden_size, num_topk=router_topk, use_fp8_dispatch=use_fp8_dispatch,
                                    allow_hybrid_mode=allow_hybrid_mode, sl_idx=0,
                                    prefer_overlap_with_compute=False)
        cls._buffer_key = key
        return cls._buffer

    @classmethod
    def destroy(cls) -> None:
        cls._buffer = None
        cls._buffer_key = None


class DeepEPv2Impl:
    def __init__(self, group, router_topk: int, num_experts: int, hidden_size: int,
                 num_max_dispatch_tokens_per_rank: int = 128, expert_alignment: int = 128):
        self.group, self.router_topk, self.num_experts, self.hidden_size = group, router_topk, num_experts, hidden_size
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank   # SGLANG_DEEPEP_V2_NUM_MAX_...
        self.expert_alignment = expert_alignment
        self._handle = None

    def _get_buffer(self):
        return DeepEPv2Buffer.get_buffer(self.group, self.hidden_size, self.router_topk,
                                         self.num_max_dispatch_tokens_per_rank, False)

    def _resolve_num_sms_qps(self, buffer):
        num_sms = _env_int("SGLANG_DEEPEP_V2_NUM_SMS", 0)
        if num_sms == 0:
            num_sms = buffer.get_theoretical_num_sms(self.num_experts, self.router_topk)
        num_qps = buffer.get_theoretical_num_qps(num_sms)
        return num_sms, num_qps

    def dispatch(self, hidden_states, topk_ids, topk_weights, is_extend: bool = True):
        if self._handle is not None:
            raise RuntimeError("previous dispatch handle is still unconsumed")
        buffer = self._get_buffer()
        num_sms, num_qps = self._resolve_num_sms_qps(buffer)
        recv_x, recv_topk_idx, recv_topk_weights, handle, event = buffer.dispatch(
            hidden_states, topk_idx=topk_ids.to(__import__("torch").int64), topk_weights=topk_weights,
            num_experts=self.num_experts, num_max_tokens_per_rank=self.num_max_dispatch_tokens_per_rank,
            expert_alignment=self.expert_alignment, num_sms=num_sms, num_qps=num_qps,
            use_tma_aligned_col_major_sf=False, do_cpu_sync=is_extend, do_expand=not is_extend)
        self._handle = handle
        if event.event is not None:
            event.current_stream_wait()
        return recv_x, recv_topk_idx, recv_topk_weights

    def combine(self, hidden_states, topk_weights=None):
        if self._handle is None:
            raise RuntimeError("combine without a dispatch handle")
        try:
            buffer = self._get_buffer()
            num_sms, num_qps = self._resolve_num_sms_qps(buffer)
            combined_x, _, event = buffer.combine(hidden_states, handle=self._handle, topk_weights=topk_weights,
                                                  num_sms=num_sms, num_qps=num_qps)
            if event.event is not None:
                event.current_stream_wait()
            return combined_x
        finally:
            self._handle = None


def forward_step(impl: DeepEPv2Impl, x, topk_ids, topk_weights) -> None:
    """One MoE layer of a server forward (inference: no backward)."""
    recv_x, _, recv_w = impl.dispatch(x, topk_ids, topk_weights)
    impl.combine(recv_x, recv_w)
