"""SGLang normal-mode DeepEP path.

Transcribed from sgl-project/sglang@003a81bf2870c07b110de13641ad4f0ba63b1fa1
python/sglang/srt/layers/moe/token_dispatcher/deepep.py: DeepEPConfig.__init__ (load_json_config of --deepep-config,
Config(**normal_dispatch), Config(**normal_combine), assert equal num_sms), DeepEPBuffer.get_deepep_buffer (normal
mode: hidden_bytes = hidden_size * param_bytes, max of the two configs' get_nvl_buffer_size_hint, falling back to
Buffer.get_*_config when no --deepep-config; num_qps_per_rank = num_sms), _DeepEPDispatcherImplNormal._dispatch_core
(expert_alignment=128 if DeepGEMM JIT else 1, config=normal_dispatch_config) and _combine_core
(config=normal_combine_config). load_json_config (sglang.srt.utils) is transcribed from SGLang's documented
behaviour: a JSON string, else a file path."""

from __future__ import annotations

import json


def load_json_config(data: str):
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        with open(data) as f:
            return json.load(f)


class DeepEPConfig:
    def __init__(self, config_str: str | None):
        from deep_ep import Buffer, Config
        if config_str:
            config_parsed = load_json_config(config_str)
            config_dispatch = config_parsed["normal_dispatch"]
            config_combine = config_parsed["normal_combine"]
            self.normal_dispatch_config = Config(**config_dispatch)
            self.normal_combine_config = Config(**config_combine)
            assert config_dispatch["num_sms"] == config_combine["num_sms"]
            self.num_sms = config_dispatch["num_sms"]
        else:
            self.normal_dispatch_config = None
            self.normal_combine_config = None
            self.num_sms = Buffer.num_sms


def get_deepep_buffer(cfg: DeepEPConfig, group, hidden_size: int, param_bytes: int):
    from deep_ep import Buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    hidden_bytes = hidden_size * param_bytes
    for config in (cfg.normal_dispatch_config or Buffer.get_dispatch_config(group.size()),
                   cfg.normal_combine_config or Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    return Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank=cfg.num_sms,
                  allow_mnnvl=True)


def forward(cfg: DeepEPConfig, buffer, x, topk_ids, topk_weights, num_experts: int, enable_jit_deepgemm: bool):
    """_dispatch_core then _combine_core. x may be (fp8 tokens, scales) as after sglang_per_token_group_quant_fp8."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_ids, num_experts)
    recv_x, _, _, num_recv_tokens_per_expert, handle, _ = buffer.dispatch(
        x, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, expert_alignment=128 if enable_jit_deepgemm else 1,
        config=cfg.normal_dispatch_config)
    hidden = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    buffer.combine(hidden.to(__import__("torch").bfloat16), handle, config=cfg.normal_combine_config)
    return num_recv_tokens_per_expert
